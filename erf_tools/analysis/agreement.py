"""Do two ERF maps of one model agree within their noise? Per-pixel z² from the maps' standard errors.

Used to compare image sources (issue 17: synthetic dead-leaves images against photographs,
``figures/synthetic_vs_photos.py``). Both maps are normalised to sum 1 (sources differ in contrast, so the shapes are
compared), their standard errors with them; per pixel ``z² = (a - b)² / (se_a² + se_b²)``, averaged over pixels.

When the maps agree, the mean z² is *not* 1: the standard errors come from few images of heavy-tailed, skewed
per-image gradients (about half of a Kim-protocol per-image map is clamped to 0), and a small-sample error is
correlated with its mean. Two references: :func:`welch_expected_z2` (Gaussian per-image values, Student t per pixel)
and :func:`split_null` (the same statistic between disjoint random splits of one source's per-image maps: agreement
by construction, with the real per-image distribution). Neighbouring pixels are correlated, so the mean z² is compared
with the split null's distribution, not read as a χ² test. NumPy only.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _shape_and_error(result) -> tuple[np.ndarray, np.ndarray, int]:
    """The map normalised to sum 1, its per-pixel standard error in the same units, the independent image count."""
    if getattr(result, "map_standard_error", None) is None:
        raise ValueError("map_agreement needs results with map_standard_error (at least 2 images)")
    values = np.asarray(result.map, dtype=np.float64)
    total = values.sum()
    if not total > 0:
        raise ValueError("map_agreement needs maps with a positive sum")
    independent = getattr(result, "num_independent_images", None) or result.num_images
    return values / total, np.asarray(result.map_standard_error, dtype=np.float64) / total, int(independent)


def z_squared(mean_a, se_a, mean_b, se_b) -> np.ndarray:
    """Per-pixel z² = (a - b)² / (se_a² + se_b²) over the pixels where the combined error is non-zero."""
    spread = se_a ** 2 + se_b ** 2
    keep = spread > 0
    return (mean_a - mean_b)[keep] ** 2 / spread[keep]


def welch_expected_z2(se_a, n_a, se_b, n_b) -> float:
    """Mean over pixels of E[z²] = ν/(ν-2) when both maps estimate the same mean and the per-image values are
    Gaussian: z is then t-distributed with the Welch–Satterthwaite degrees of freedom ν of that pixel."""
    va, vb = se_a ** 2, se_b ** 2
    keep = (va + vb) > 0
    va, vb = va[keep], vb[keep]
    nu = (va + vb) ** 2 / (va ** 2 / max(n_a - 1, 1) + vb ** 2 / max(n_b - 1, 1))
    return float(np.mean(np.where(nu > 2, nu / np.maximum(nu - 2, 1e-12), np.inf)))


def split_null(result, n_small: int, repeats: int = 20, seed: int = 0) -> np.ndarray:
    """Mean z² between disjoint subsets of ONE source (``n_small`` images against the rest), ``repeats`` random
    splits: the statistic's distribution when the two maps agree by construction, with the same heavy-tailed
    per-image maps and the same small count on one side. Needs full-resolution per-image maps
    (``per_image_resolution`` ≥ the input size) and independent images."""
    if getattr(result, "per_image_maps", None) is None:
        raise ValueError("split_null needs per-image maps (keep_per_image=True)")
    independent = getattr(result, "num_independent_images", None)
    if independent is not None and independent < result.num_images:
        raise ValueError(f"split_null needs independent images ({independent} independent of {result.num_images}): "
                         "crops of one photograph on both sides of a split would agree too well")
    maps = np.asarray(result.per_image_maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[1:] != np.asarray(result.map).shape:
        raise ValueError("split_null needs full-resolution per-image maps (per_image_resolution >= input size)")
    n = maps.shape[0]
    if not 2 <= n_small <= n - 2:
        raise ValueError(f"cannot split {n} images into {n_small} and the rest")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(repeats):
        order = rng.permutation(n)
        parts = []
        for idx in (order[:n_small], order[n_small:]):
            sub = maps[idx]
            total = sub.mean(axis=0).sum()
            parts.append((sub.mean(axis=0) / total, sub.std(axis=0, ddof=1) / np.sqrt(len(idx)) / total))
        values.append(z_squared(parts[0][0], parts[0][1], parts[1][0], parts[1][1]).mean())
    return np.asarray(values)


def central_mass(result, radius: float) -> tuple[float, float]:
    """(fraction of the map's mass within ``radius`` px of the receptive-field centre, its standard error over
    images by the delta method for a ratio of means). Needs full-resolution per-image maps."""
    maps = np.asarray(result.per_image_maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[1:] != np.asarray(result.map).shape or len(maps) < 2:
        raise ValueError("central_mass needs full-resolution per-image maps of at least 2 images")
    height, width = maps.shape[1:]
    centre = result.receptive_field_centre or ((height - 1) / 2, (width - 1) / 2)
    yy, xx = np.mgrid[:height, :width]
    inside = np.hypot(yy - centre[0], xx - centre[1]) < radius
    part, whole = maps[:, inside].sum(axis=1), maps.sum(axis=(1, 2))
    fraction = part.sum() / whole.sum()
    independent = min(len(maps), getattr(result, "num_independent_images", None) or len(maps))
    error = np.sqrt((part - fraction * whole).var(ddof=1) / independent) / whole.mean()
    return float(fraction), float(error)


def map_agreement(first, second, null_repeats: int = 20) -> dict[str, Any]:
    """Per-pixel agreement of two ERFResults' shapes from their per-pixel standard errors (module docstring).

    Keys: ``mean_z2`` (the statistic), ``expected_z2_gaussian``, ``null_mean_z2`` / ``null_q95_z2`` /
    ``null_max_z2`` (:func:`split_null` of the source with more images, ``null_repeats`` splits; absent when neither
    has full-resolution per-image maps of independent images), and ``central_mass``: for radii of 1/24, 1/10 and
    1/5 of the map side, each map's mass fraction within the radius with its standard error and the difference in
    units of the combined error (where in the map a disagreement sits)."""
    mean_a, se_a, n_a = _shape_and_error(first)
    mean_b, se_b, n_b = _shape_and_error(second)
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"maps differ in shape: {mean_a.shape} vs {mean_b.shape}")
    z2 = z_squared(mean_a, se_a, mean_b, se_b)
    out: dict[str, Any] = {"mean_z2": float(z2.mean()), "median_z2": float(np.median(z2)),
                           "expected_z2_gaussian": welch_expected_z2(se_a, n_a, se_b, n_b),
                           "pixels": int(z2.size), "n_first": n_a, "n_second": n_b,
                           "max_abs_z": float(np.sqrt(z2.max())),
                           "fraction_abs_z_above_2": float((z2 > 4).mean())}
    # the null from splits of whichever source has more images and full-resolution per-image maps
    for result in sorted((first, second), key=lambda r: -r.num_images):
        try:
            null = split_null(result, min(n_a, n_b), repeats=null_repeats)
        except ValueError:
            continue
        out["null_source"] = result.image_source.get("kind", "?")
        out["null_mean_z2"] = float(null.mean())
        out["null_q95_z2"] = float(np.quantile(null, 0.95))
        out["null_max_z2"] = float(null.max())
        break
    side = min(mean_a.shape)
    masses = {}
    for radius in (side / 24, side / 10, side / 5):
        try:
            (fa, ea), (fb, eb) = central_mass(first, radius), central_mass(second, radius)
        except ValueError:
            break
        error = float(np.hypot(ea, eb))
        masses[f"{radius:.0f}px"] = {"first": [fa, ea], "second": [fb, eb],
                                     "z": (fa - fb) / error if error > 0 else (0.0 if fa == fb else float("inf"))}
    if masses:
        out["central_mass"] = masses
    return out
