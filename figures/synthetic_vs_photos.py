"""The ERF of one model from two image sources, side by side, with a per-pixel agreement test (issue 17, item 2).

    python figures/synthetic_vs_photos.py --model tf_efficientnet_lite1 --weights PATH --protocol kim2023 \\
        --num-images 48 12 --out figures/synthetic_vs_photos.png     # 48 synthetic images, the 12 photographs

Measures the ERF with each source (default ``synthetic`` and ``sample``), scores both (:func:`erf_tools.analyze`,
bootstrap intervals over images) and draws them on one colour scale with their fitted Gaussians. The agreement
statistic uses each map's per-pixel standard error (from the per-image maps where they are kept at full resolution,
by the delta method for a map normalised to sum 1; else ``ERFResult.map_standard_error``, which divides the per-image
variance by the number of *independent* images): both maps are normalised to sum 1 (the sources differ in contrast,
so gradient magnitudes are compared as shapes), then per pixel

    z² = (a - b)² / (se_a² + se_b²)

``mean_z2`` is its mean over pixels, between the smaller source's m images and the first n − m of the larger
source's n. Its expected value when the maps agree is not 1: the standard errors come from few images (12
photographs) of heavy-tailed per-image gradients. Two references are reported: ``expected_z2_gaussian`` (ν/(ν-2) per
pixel, Welch–Satterthwaite ν, Gaussian per-image values) and ``null_mean_z2`` / ``null_q95_z2``, the same statistic
between random disjoint subsets of m and n − m images of the larger source: agreement by construction with the real
per-image distribution and the statistic's own image counts (z² grows with the larger side's count). ``blocks``: the
same on 8×8-pixel block sums, the test with power against smooth changes of shape. Neighbouring pixels are
correlated, so read the mean against the null, not as a χ² test. ``sigma_ratio`` is the ratio of the fitted σ
(geometric mean of major and minor axes), ``agd_within`` whether each AGD score lies inside the other source's
interval.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from erf_tools import analyze, measure_erf  # noqa: E402
from erf_tools.analysis.agreement import map_agreement  # noqa: E402
from erf_tools.images import open_image_source  # noqa: E402
from erf_tools.plotting import compare_figure, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent


def measure_sources(model, sources: tuple[str, ...] = ("synthetic", "sample"), *, num_images=64,
                    seed: int = 0, **options: Any) -> dict[str, Any]:
    """``{source: ERFResult}``: the same model, protocol and options over each image source. ``num_images``: one
    count for every source or one per source (e.g. ``(48, 12)``: 48 synthetic images, the 12 photographs)."""
    counts = [num_images] * len(sources) if isinstance(num_images, int) else list(num_images)
    if len(counts) != len(sources):
        raise ValueError(f"{len(counts)} image counts for {len(sources)} sources")
    options.setdefault("keep_per_image", True)
    results = {}
    for spec, count in zip(sources, counts):
        source = open_image_source(spec, num_images=count, seed=seed)
        results[spec] = measure_erf(model, source, num_images=count, seed=seed, **options)
    return results


def compare(results: dict[str, Any], bootstrap: int = 200) -> tuple[dict[str, Any], list[Any]]:
    """Scores of each result and the agreement of the first two."""
    names = list(results)
    reports = [analyze(results[name], bootstrap=bootstrap) for name in names]
    summary: dict[str, Any] = {"sources": {}}
    for name, report in zip(names, reports):
        # The raw full-covariance fit (also when flagged): the comparison is between two fits of the same model.
        sigma = float(np.sqrt(report.fit.sigma_major * report.fit.sigma_minor))
        low, high = report.interval("agd_score")
        summary["sources"][name] = {"agd_score": float(report.agd_score), "agd_score_raw": float(report.agd_score_raw),
                                    "agd_interval": None if np.isnan(low) else [float(low), float(high)],
                                    "sigma_px": sigma, "sigma_major_px": float(report.fit.sigma_major),
                                    "sigma_minor_px": float(report.fit.sigma_minor), "fit_ok": bool(report.fit.ok),
                                    "num_images": results[name].num_images,
                                    "independent_images": results[name].num_independent_images}
    if len(names) >= 2:
        a, b = (summary["sources"][n] for n in names[:2])
        summary["agreement"] = map_agreement(results[names[0]], results[names[1]])
        summary["agreement"]["sigma_ratio"] = a["sigma_px"] / b["sigma_px"]
        summary["agreement"]["sigma_within_10pct"] = abs(a["sigma_px"] / b["sigma_px"] - 1) <= 0.10
        summary["agreement"]["agd_within"] = all(
            s["agd_interval"] is not None and s["agd_interval"][0] <= o["agd_score"] <= s["agd_interval"][1]
            for s, o in ((a, b), (b, a)))
    return summary, reports


def draw(results: dict[str, Any], reports: list[Any], out: Path) -> list[Path]:
    figure = compare_figure(list(results.values()), reports, contours=True,
                            title="ERF from " + " vs ".join(results))
    for ax, (name, result), report in zip(figure.axes, results.items(), reports):
        ax.set_title(f"{name}: {result.num_independent_images} independent images\nAGD {report.agd_score:.3f}",
                     fontsize=7)
    return save_figure(figure, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--weights", default="random", help="random, active, timm or a checkpoint path")
    parser.add_argument("--protocol", default="kim2023")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the protocol's)")
    parser.add_argument("--num-images", type=int, nargs="+", default=[64],
                        help="one count, or one per source (e.g. 48 12)")
    parser.add_argument("--sources", nargs="+", default=["synthetic", "sample"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--per-image-resolution", type=int, default=1024,
                        help="keep per-image maps at full resolution up to this size (for the split null)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--save", type=Path, default=None,
                        help="save each result as DIR/<source>.npz/.json (figures/synthetic_images.py --erfs reads them)")
    parser.add_argument("--out", type=Path, default=HERE / "synthetic_vs_photos.png")
    args = parser.parse_args(argv)
    options = {"input_size": args.size} if args.size else {}
    counts = args.num_images[0] if len(args.num_images) == 1 else tuple(args.num_images)
    results = measure_sources(args.model, tuple(args.sources), num_images=counts, protocol=args.protocol,
                              weights=args.weights, batch_size=args.batch_size, device=args.device,
                              per_image_resolution=args.per_image_resolution, **options)
    if args.save:
        from erf_tools import save_result

        for name, result in results.items():
            save_result(result, args.save / name.replace(":", "_"))
    summary, reports = compare(results, bootstrap=args.bootstrap)
    text = json.dumps(summary, indent=2, default=float)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("wrote", *draw(results, reports, args.out))


if __name__ == "__main__":
    main()
