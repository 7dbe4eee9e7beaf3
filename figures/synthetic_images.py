"""Draw figures/synthetic_images.png: generated dead-leaves images beside the sample photographs (issue 17).

    python figures/synthetic_images.py                 # 6 synthetic images at 256 px and the 12 photographs

The top row shows images 0..5 of the ``synthetic`` source (seed 0) at 256×256 px, the rows below the 12 photographs of
the ``sample`` source, centre-cropped to squares. Runs in a few seconds.
"""
from __future__ import annotations

import argparse
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


def gallery(num_synthetic: int = 6, size: int = 256, seed: int = 0, columns: int = 6) -> Figure:
    synthetic = open_image_source(f"synthetic:{size}", num_images=num_synthetic, seed=seed)
    sample = open_image_source("sample")
    generated = [np.asarray(synthetic.load(i)) for i in range(num_synthetic)]
    photos = [np.asarray(sample.load(i)) for i in range(len(SAMPLE_FILES))]
    panels = [(image, f"synthetic[{seed}:{i}]\nslope {slope_of(image):.2f}") for i, image in enumerate(generated)]
    panels += [(square(image, size), f"{name}\nslope {slope_of(square(image, size)):.2f}")
               for name, image in zip(SAMPLE_FILES, photos)]
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(1.9 * columns, 2.1 * rows + 0.5), dpi=110)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (image, label) in zip(axes.flat, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=7)
    figure.suptitle("Top: coloured, shaded dead-leaves images (erf_tools.synthetic_images, 256 px). Below: the 12 "
                    "scikit-image photographs of the 'sample' source.\n'slope': power-spectrum slope of the luminance "
                    "over 0.02-0.25 cycles/px at 256 px (1/f² = -2)", fontsize=8)
    return figure


def slope_of(image: np.ndarray) -> float:
    frequency, power = radial_power_spectrum(luminance(image))
    return spectrum_slope(frequency, power)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-synthetic", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "synthetic_images.png")
    args = parser.parse_args(argv)
    written = save_figure(gallery(args.num_synthetic, args.size, args.seed), args.out)
    print("wrote", *written)


if __name__ == "__main__":
    main()
