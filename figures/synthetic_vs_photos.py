"""The ERF of one model from two image sources, side by side, with a per-pixel agreement test (issue 17, item 2).

    python figures/synthetic_vs_photos.py --model efficientnet_lite1 --weights PATH --protocol kim2023 \\
        --num-images 64 --out figures/synthetic_vs_photos.png

Measures the ERF with each source (default ``synthetic`` and ``sample``), scores both (:func:`erf_tools.analyze`,
bootstrap intervals over images) and draws them on one colour scale with their fitted Gaussians. The agreement
statistic uses the per-image maps: each source's maps are divided by the total of its mean map (the sources differ in
contrast, so gradient magnitudes are compared as shapes), then per pixel of the block-summed grid

    z² = (mean_a - mean_b)² / (var_a / n_a + var_b / n_b)

with the variances over images; ``chi2_per_pixel`` is the mean of z² (≈ 1 when the maps agree within their noise;
neighbouring pixels are correlated, so read it as a scale, not as an exact χ² test), ``sigma_ratio`` the ratio of
the fitted σ (geometric mean of major and minor), and ``agd_within`` whether each AGD score lies inside the other
source's interval. ``n`` counts independent source images (:meth:`ImageSource.num_independent`), not crops.
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
from erf_tools.images import open_image_source  # noqa: E402
from erf_tools.plotting import compare_figure, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent


def measure_sources(model, sources: tuple[str, ...] = ("synthetic", "sample"), *, num_images: int = 64,
                    seed: int = 0, **options: Any) -> dict[str, Any]:
    """``{source: ERFResult}``: the same model, protocol and options over each image source."""
    results = {}
    for spec in sources:
        source = open_image_source(spec, num_images=num_images, seed=seed)
        result = measure_erf(model, source, num_images=num_images, seed=seed, keep_per_image=True, **options)
        result.image_source["independent_images"] = source.num_independent(result.num_images)
        results[spec] = result
    return results


def map_agreement(first, second) -> dict[str, float]:
    """Per-pixel agreement of two ERFResults' shape, from their per-image maps (see the module docstring)."""
    stats = []
    for result in (first, second):
        maps = np.asarray(result.per_image_maps, dtype=np.float64)
        if maps.ndim != 3 or maps.shape[0] < 2:
            raise ValueError("map_agreement needs per-image maps of at least 2 images (keep_per_image=True)")
        maps = maps / maps.mean(axis=0).sum()
        independent = result.image_source.get("independent_images", maps.shape[0])
        stats.append((maps.mean(axis=0), maps.var(axis=0, ddof=1), int(independent)))
    if stats[0][0].shape != stats[1][0].shape:
        raise ValueError(f"per-image maps differ in shape: {stats[0][0].shape} vs {stats[1][0].shape}")
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = stats
    spread = var_a / n_a + var_b / n_b
    keep = spread > 0
    z2 = (mean_a - mean_b)[keep] ** 2 / spread[keep]
    return {"chi2_per_pixel": float(z2.mean()), "pixels": int(keep.sum()), "n_first": n_a, "n_second": n_b,
            "max_abs_z": float(np.sqrt(z2.max()))}


def compare(results: dict[str, Any], bootstrap: int = 200) -> tuple[dict[str, Any], list[Any]]:
    """Scores of each result and the agreement of the first two."""
    names = list(results)
    reports = [analyze(results[name], bootstrap=bootstrap) for name in names]
    summary: dict[str, Any] = {"sources": {}}
    for name, report in zip(names, reports):
        # The raw full-covariance fit (also when flagged): the comparison is between two fits of the same model.
        sigma = float(np.sqrt(report.fit.sigma_major * report.fit.sigma_minor))
        low, high = report.interval("agd_score")
        summary["sources"][name] = {"agd_score": float(report.agd_score),
                                    "agd_interval": None if np.isnan(low) else [float(low), float(high)],
                                    "sigma_px": sigma, "fit_ok": bool(report.fit.ok),
                                    "num_images": results[name].num_images,
                                    "independent_images": results[name].image_source.get("independent_images")}
    if len(names) >= 2:
        a, b = (summary["sources"][n] for n in names[:2])
        summary["agreement"] = map_agreement(results[names[0]], results[names[1]])
        summary["agreement"]["sigma_ratio"] = a["sigma_px"] / b["sigma_px"]
        summary["agreement"]["agd_within"] = all(
            s["agd_interval"] is not None and s["agd_interval"][0] <= o["agd_score"] <= s["agd_interval"][1]
            for s, o in ((a, b), (b, a)))
    return summary, reports


def draw(results: dict[str, Any], reports: list[Any], out: Path) -> list[Path]:
    figure = compare_figure(list(results.values()), reports, contours=True,
                            title="ERF from " + " vs ".join(results))
    for ax, name in zip(figure.axes, results):
        ax.set_title(f"{name}\n{ax.get_title()}", fontsize=7)
    return save_figure(figure, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--weights", default="random", help="random, active, timm or a checkpoint path")
    parser.add_argument("--protocol", default="kim2023")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the protocol's)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--sources", nargs="+", default=["synthetic", "sample"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "synthetic_vs_photos.png")
    args = parser.parse_args(argv)
    options = {"input_size": args.size} if args.size else {}
    results = measure_sources(args.model, tuple(args.sources), num_images=args.num_images, protocol=args.protocol,
                              weights=args.weights, batch_size=args.batch_size, device=args.device, **options)
    summary, reports = compare(results, bootstrap=args.bootstrap)
    print(json.dumps(summary, indent=2, default=float))
    print("wrote", *draw(results, reports, args.out))


if __name__ == "__main__":
    main()
