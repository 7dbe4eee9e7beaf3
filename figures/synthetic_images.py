"""Draw figures/synthetic_images.png: generated dead-leaves images beside the sample photographs (issue 17).

    python figures/synthetic_images.py                 # 6 synthetic images at 256 px and the 12 photographs
    python figures/synthetic_vs_photos.py --model tf_efficientnet_lite1 --weights PATH --protocol kim2023 \\
        --num-images 48 12 --save runs/lite1 --json runs/lite1/summary.json
    python figures/synthetic_images.py --erfs runs/lite1/synthetic runs/lite1/sample --summary runs/lite1/summary.json

The top row shows images 0..5 of the ``synthetic`` source (seed 0) at 256×256 px, the rows below the 12 photographs of
the ``sample`` source, centre-cropped to squares. With ``--erfs`` (two saved results, :func:`erf_tools.save_result`)
a last row shows the two ERFs side by side on one log colour scale with their fitted Gaussians (1σ, 2σ), their
radial profiles, and the agreement numbers of ``--summary`` (the JSON of ``figures/synthetic_vs_photos.py``).
Runs in a few seconds.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from erf_tools.images import SAMPLE_FILES, open_image_source  # noqa: E402
from erf_tools.plotting import save_figure  # noqa: E402
from erf_tools.synthetic_images import luminance, radial_power_spectrum, spectrum_slope  # noqa: E402

HERE = Path(__file__).resolve().parent


def square(image: np.ndarray, side: int) -> np.ndarray:
    """Centre crop to a square, then resize to side×side (for display only)."""
    from PIL import Image

    height, width = image.shape[:2]
    edge = min(height, width)
    top, left = (height - edge) // 2, (width - edge) // 2
    crop = Image.fromarray(image[top:top + edge, left:left + edge])
    return np.asarray(crop.resize((side, side), Image.Resampling.BICUBIC))


def gallery(num_synthetic: int = 6, size: int = 256, seed: int = 0, columns: int = 6, erfs=None,
            summary: dict | None = None) -> Figure:
    synthetic = open_image_source(f"synthetic:{size}", num_images=num_synthetic, seed=seed)
    sample = open_image_source("sample")
    generated = [np.asarray(synthetic.load(i)) for i in range(num_synthetic)]
    photos = [np.asarray(sample.load(i)) for i in range(len(SAMPLE_FILES))]
    panels = [(image, f"synthetic[{seed}:{i}]\nslope {slope_of(image):.2f}") for i, image in enumerate(generated)]
    panels += [(square(image, size), f"{name}\nslope {slope_of(square(image, size)):.2f}")
               for name, image in zip(SAMPLE_FILES, photos)]
    rows = -(-len(panels) // columns)
    extra = 3.4 if erfs else 0.0
    figure = Figure(figsize=(1.9 * columns, 2.1 * rows + 0.5 + extra), dpi=110)
    if erfs:
        top, bottom = figure.subfigures(2, 1, height_ratios=[2.1 * rows + 0.5, extra])
        erf_row(bottom, erfs, summary)
    else:
        top = figure
    axes = top.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (image, label) in zip(axes.flat, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=7)
    top.suptitle("Top: coloured, shaded dead-leaves images (erf_tools.synthetic_images, 256 px). Below: the 12 "
                    "scikit-image photographs of the 'sample' source.\n'slope': power-spectrum slope of the luminance "
                    "over 0.02-0.25 cycles/px at 256 px (1/f² = -2)", fontsize=8)
    return figure


def erf_row(figure, erfs, summary: dict | None = None) -> None:
    """Two ERFs (saved results: synthetic, photographs) on one log colour scale, their radial profiles and the
    agreement numbers."""
    from erf_tools import analyze, load_result
    from erf_tools.plotting import colour_norm, radial_profiles

    results = [load_result(path) for path in erfs]
    reports = [analyze(result, bootstrap=0) for result in results]
    names = ["synthetic" if "synthetic" in str(r.image_source.get("kind", "")) else str(r.image_source.get("kind"))
             for r in results]
    maps = [np.asarray(r.map, dtype=np.float64) / np.asarray(r.map).sum() for r in results]
    norm = colour_norm("log", max(m.max() for m in maps), log_decades=2.5)
    axes = figure.subplots(1, 5, gridspec_kw={"width_ratios": [1, 1, 0.06, 1.25, 1.45], "wspace": 0.5})
    colorbar_ax, axes = axes[2], [axes[0], axes[1], axes[3], axes[4]]
    for ax, data, result, report, name in zip(axes, maps, results, reports, names):
        image = ax.imshow(np.where(data > 0, data, np.nan), norm=norm, cmap="inferno", interpolation="nearest")
        fit = report.fit
        from matplotlib.patches import Ellipse

        for k in (1, 2):
            ax.add_patch(Ellipse((fit.centre[1], fit.centre[0]), 2 * k * fit.sigma_major, 2 * k * fit.sigma_minor,
                                 angle=np.degrees(fit.theta), fill=False, edgecolor="white",
                                 linestyle="-" if fit.ok else "--", linewidth=0.8))
        sigma = np.sqrt(fit.sigma_major * fit.sigma_minor)
        # the summary's score (with its bootstrap's bias correction) where there is one, else the plug-in estimate
        scored = (summary or {}).get("sources", {}).get(name, {})
        agd = scored.get("agd_score", report.agd_score)
        ax.set_title(f"ERF from {name}\n{result.num_independent_images} independent images\n"
                     f"σ {fit.sigma_major:.1f}×{fit.sigma_minor:.1f} px (√ {sigma:.1f})\nAGD {agd:.3f}"
                     + ("" if fit.ok else " (fit flagged)"), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = figure.colorbar(image, cax=colorbar_ax)
    bar.set_label("ERF / sum (log)", fontsize=6)
    bar.ax.tick_params(which="both", labelsize=6)
    bar.ax.yaxis.set_ticks_position("left")
    bar.ax.yaxis.set_label_position("left")
    radial_profiles(results, axes[2], normalise="sum", labels=names)
    axes[2].set_title("radial profiles\n(ring mean of ERF / sum)", fontsize=7)
    axes[2].legend(fontsize=6, frameon=False)
    axes[2].tick_params(which="both", labelsize=6)
    axes[2].xaxis.label.set_size(6)
    axes[2].set_ylabel("")  # the title says it
    axes[3].set_axis_off()
    if summary:
        s, p = summary["sources"].get("synthetic", {}), summary["sources"].get("sample", {})
        a = summary["agreement"]
        lines = [f"{results[0].model}, {results[0].protocol}, {results[0].input_size[0]} px",
                 f"σ ratio synthetic/photos {a['sigma_ratio']:.3f}",
                 f"AGD synthetic {s['agd_score']:.3f} [{s['agd_interval'][0]:.2f}, {s['agd_interval'][1]:.2f}]",
                 f"AGD photos {p['agd_score']:.3f} [{p['agd_interval'][0]:.2f}, {p['agd_interval'][1]:.2f}]",
                 f"mean z² {a['mean_z2']:.3f}" + (f" (null {a['null_sizes'][0]} vs {a['null_sizes'][1]}: "
                                                  f"{a['null_mean_z2']:.3f}, 95 % {a['null_q95_z2']:.3f})"
                                                  if "null_sizes" in a else " (no null: no per-image maps)")]
        if "blocks" in a:
            b = a["blocks"]
            lines.append(f"{b['block']}×{b['block']} blocks: {b['mean_z2']:.3f} (null {b['null_mean_z2']:.3f}, "
                         f"95 % {b['null_q95_z2']:.3f})")
        for key, value in a.get("central_mass", {}).items():
            lines.append(f"mass<{key}: {value['first'][0]:.4f}±{value['first'][1]:.4f} vs "
                         f"{value['second'][0]:.4f}±{value['second'][1]:.4f} ({value['z']:+.1f} SE)")
        axes[3].text(0.0, 0.5, "\n".join(lines), fontsize=6.5, va="center", ha="left", family="monospace",
                     transform=axes[3].transAxes)


def slope_of(image: np.ndarray) -> float:
    frequency, power = radial_power_spectrum(luminance(image))
    return spectrum_slope(frequency, power)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-synthetic", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--erfs", type=Path, nargs=2, default=None, metavar=("SYNTHETIC", "PHOTOS"),
                        help="two saved results (figures/synthetic_vs_photos.py --save) to draw in a last row")
    parser.add_argument("--summary", type=Path, default=None, help="the JSON of figures/synthetic_vs_photos.py")
    parser.add_argument("--out", type=Path, default=HERE / "synthetic_images.png")
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text()) if args.summary else None
    written = save_figure(gallery(args.num_synthetic, args.size, args.seed, erfs=args.erfs, summary=summary), args.out)
    print("wrote", *written)


if __name__ == "__main__":
    main()
