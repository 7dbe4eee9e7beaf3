"""Do two ERF maps of one model agree within their noise? Per-pixel z² from the maps' standard errors.

Used to compare image sources (issue 17: synthetic dead-leaves images against photographs,
``figures/synthetic_vs_photos.py``). Both maps are normalised to sum 1 (sources differ in contrast, so the shapes are
compared), their standard errors with them (by the delta method where per-image maps are kept, see
:func:`_subset_shape`); per pixel ``z² = (a - b)² / (se_a² + se_b²)``, averaged over pixels.

When the maps agree, the mean z² is *not* 1: the standard errors come from few images of heavy-tailed, skewed
per-image gradients (about half of a Kim-protocol per-image map is clamped to 0), and a small-sample error is
correlated with its mean. Two references: :func:`welch_expected_z2` (Gaussian per-image values, Student t per pixel)
and :func:`split_null` (the same statistic between disjoint random subsets of one source's per-image maps: agreement
by construction, with the real per-image distribution). The null must have the observed statistic's two image counts:
at pixels where the few images are all near 0 and the many are not, z² grows with the larger count (on a trained
EfficientNet-Lite1, 12 against 48 images of one source give a mean z² of 1.42 ± 0.04, 12 against 36 give 1.30). So
:func:`map_agreement` compares the smaller source with the first n − m images of the larger one (n images, m in the
smaller) and draws the null as m against n − m. Neighbouring pixels are correlated, so the mean z² is compared with
the null's distribution, not read as a χ² test. NumPy only.
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


def split_null(result, n_small: int, repeats: int = 20, seed: int = 0, n_large: int | None = None,
               block: int = 1) -> np.ndarray:
    """Mean z² between disjoint subsets of ONE source, ``n_small`` images against ``n_large`` (default: the rest),
    ``repeats`` random splits: the statistic's distribution when the two maps agree by construction, with the same
    heavy-tailed per-image maps and the same two image counts as the comparison it is the null of; ``block`` > 1:
    of the maps summed over block×block pixels (:func:`block_sums`). Needs full-resolution per-image maps
    (``per_image_resolution`` ≥ the input size) and independent images."""
    problem = _per_image_problem(result)
    if problem is not None:
        raise ValueError(f"split_null needs {problem}")
    maps = block_sums(np.asarray(result.per_image_maps, dtype=np.float64), block)
    return _split_null(maps, n_small, maps.shape[0] - n_small if n_large is None else n_large, repeats, seed)


def _split_null(maps: np.ndarray, n_small: int, n_large: int, repeats: int, seed: int) -> np.ndarray:
    """:func:`split_null` on per-image maps already checked (and block-summed)."""
    n = maps.shape[0]
    if not (n_small >= 2 and n_large >= 2 and n_small + n_large <= n):
        raise ValueError(f"cannot split {n} images into {n_small} and {n_large}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(repeats):
        order = rng.permutation(n)
        small, large = _subset_shape(maps[order[:n_small]]), _subset_shape(maps[order[n_small:n_small + n_large]])
        values.append(z_squared(*small, *large).mean())
    return np.asarray(values)


def _per_image_problem(result) -> str | None:
    """Why the result's per-image maps cannot serve a split of independent full-resolution maps, or None."""
    maps = getattr(result, "per_image_maps", None)
    if maps is None:
        return "per-image maps (keep_per_image=True)"
    independent = getattr(result, "num_independent_images", None)
    if independent is not None and independent < result.num_images:
        return (f"independent images ({independent} independent of {result.num_images}): crops of one photograph "
                "on both sides of a split would agree too well")
    if np.ndim(maps) != 3 or np.shape(maps)[1:] != np.shape(result.map):
        return "full-resolution per-image maps (per_image_resolution >= input size)"
    return None


def block_sums(maps: np.ndarray, block: int) -> np.ndarray:
    """Per-image maps (n × H × W) summed over block×block pixels (edges zero-padded to whole blocks)."""
    if block == 1:
        return maps
    if block < 1:
        raise ValueError(f"block must be a positive number of pixels, got {block}")
    n, height, width = maps.shape
    rows, cols = -(-height // block), -(-width // block)
    padded = np.zeros((n, rows * block, cols * block), dtype=maps.dtype)
    padded[:, :height, :width] = maps
    return padded.reshape(n, rows, block, cols, block).sum(axis=(2, 4))


def _subset_shape(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of independent per-image maps normalised to sum 1, and its per-pixel standard error in the same units.

    The shape is a ratio of means, mean map / mean total, so its error is the delta method's: the spread over images
    of each map minus the shape times that image's total. The plain error of the mean map over the mean total would
    count the images' differences in overall gradient size (contrast; the photographs' totals differ 8-fold), which
    the normalisation removes."""
    totals = maps.sum(axis=(1, 2))
    shape = maps.mean(axis=0) / totals.mean()
    residual = maps - shape[None] * totals[:, None, None]
    return shape, residual.std(axis=0, ddof=1) / np.sqrt(len(maps)) / totals.mean()


def _null_summary(null: np.ndarray) -> dict[str, float]:
    return {"null_mean_z2": float(null.mean()), "null_q95_z2": float(np.quantile(null, 0.95)),
            "null_max_z2": float(null.max())}


def _independent_full_maps(result) -> np.ndarray | None:
    """The result's per-image maps (float64) if they are at full resolution and of independent images, else None."""
    if _per_image_problem(result) is not None:
        return None
    return np.asarray(result.per_image_maps, dtype=np.float64)


def _null_source(first, second, n_small: int) -> tuple[Any, np.ndarray] | None:
    """(result, its per-image maps) of the source that can give the null (more images, full resolution,
    independent), or None."""
    for result in sorted((first, second), key=lambda r: -r.num_images):
        maps = _independent_full_maps(result)
        if maps is not None and len(maps) - n_small >= 2:
            return result, maps
    return None


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


def map_agreement(first, second, null_repeats: int = 20, block: int = 8) -> dict[str, Any]:
    """Per-pixel agreement of two ERFResults' shapes from their per-pixel standard errors (module docstring).

    Keys: ``mean_z2`` (the statistic; when a null can be drawn, between the smaller source's m images and the first
    ``reference_images`` = n − m of the larger one's n, errors by the delta method where the smaller source has
    per-image maps), ``mean_z2_raw`` (the statistic before: all images of both, errors from ``map_standard_error``;
    not comparable with the null, whose counts it does not have), ``expected_z2_gaussian`` (at the counts of ``mean_z2``),
    ``null_mean_z2`` / ``null_q95_z2`` / ``null_max_z2`` (:func:`split_null` of the larger source, m against n − m,
    ``null_repeats`` splits; absent when neither has full-resolution per-image maps of independent images, and then
    ``mean_z2`` is ``mean_z2_raw``), and ``central_mass``: for radii of 1/24, 1/10 and 1/5 of the map side, each map's
    mass fraction within the radius with its standard error and the difference in units of the combined error (where
    in the map a disagreement sits).

    ``blocks`` (when both sources have full-resolution per-image maps of independent images and ``block`` > 1): the
    same test on the maps summed over block×block pixels, from the block sums' own per-image variances (neighbouring
    pixels are correlated, so these are not sums of the per-pixel ones). Its keys are those of the per-pixel test. It
    has the power the per-pixel test lacks: with a dozen skewed, half-clamped per-image maps most pixels' z² is
    dominated by the sampling noise of the few images' standard error, and a smooth change of shape hides in it (in
    tests/test_agreement.py, a 10 % wider Gaussian envelope at 12 against 48 images: the per-pixel test rejects about
    as often as under agreement, the 8 × 8 block test nearly always)."""
    mean_a, se_a, n_a = _shape_and_error(first)
    mean_b, se_b, n_b = _shape_and_error(second)
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"maps differ in shape: {mean_a.shape} vs {mean_b.shape}")
    z2_raw = z_squared(mean_a, se_a, mean_b, se_b)
    out: dict[str, Any] = {"mean_z2_raw": float(z2_raw.mean()), "pixels": int(z2_raw.size),
                           "n_first": n_a, "n_second": n_b}
    z2, expected = z2_raw, welch_expected_z2(se_a, n_a, se_b, n_b)
    n_small = min(n_a, n_b)
    null_source = _null_source(first, second, n_small)
    if null_source is not None:
        null_result, null_maps = null_source
        small_maps = _independent_full_maps(second if null_result is first else first)
        if small_maps is not None:  # the same (delta-method) errors as the null's
            mean_s, se_s = _subset_shape(small_maps)
        else:
            mean_s, se_s = (mean_b, se_b) if null_result is first else (mean_a, se_a)  # the smaller source
        n_reference = int(null_result.num_images) - n_small
        reference_maps = null_maps[:n_reference]
        mean_r, se_r = _subset_shape(reference_maps)
        z2 = z_squared(mean_s, se_s, mean_r, se_r)
        expected = welch_expected_z2(se_s, n_small, se_r, n_reference)
        null = _split_null(null_maps, n_small, n_reference, null_repeats, seed=0)
        out.update({"reference_images": n_reference, "null_source": null_result.image_source.get("kind", "?"),
                    "null_sizes": [n_small, n_reference], **_null_summary(null)})
        if block > 1 and small_maps is not None:
            small = _subset_shape(block_sums(small_maps, block))
            reference = _subset_shape(block_sums(reference_maps, block))
            z2_blocks = z_squared(*small, *reference)
            out["blocks"] = {"block": block, "cells": int(z2_blocks.size), "mean_z2": float(z2_blocks.mean()),
                             "expected_z2_gaussian": welch_expected_z2(small[1], n_small, reference[1], n_reference),
                             **_null_summary(_split_null(block_sums(null_maps, block), n_small, n_reference,
                                                         null_repeats, seed=0))}
    out.update({"mean_z2": float(z2.mean()), "median_z2": float(np.median(z2)), "expected_z2_gaussian": expected,
                "max_abs_z": float(np.sqrt(z2.max())), "fraction_abs_z_above_2": float((z2 > 4).mean())})
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
