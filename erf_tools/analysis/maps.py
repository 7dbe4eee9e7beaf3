"""Preparing ERF maps for analysis: validation, floor estimation and removal, normalisation, block reduction.

Conventions used throughout :mod:`erf_tools.analysis`: maps are indexed ``[y, x]`` (row, column), pixel centres sit at
integer coordinates, and every position is written ``(y, x)``.

Non-finite values are an error (:class:`ValueError` naming how many and where): a NaN in an averaged ERF means an image
whose gradient overflowed was not rejected, and no analysis of such a map is meaningful. Negative values are an error
for the functions that treat a map as a distribution (moments, entropy, areas); :func:`erf_tools.analysis.analyze`
clips them at zero and records the flag ``negative_values_clipped`` instead.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "MIN_SIDE",
    "check_map",
    "check_distribution",
    "estimate_floor",
    "remove_floor",
    "normalise",
    "block_reduce",
]

MIN_SIDE = 3
"""Smallest number of rows and columns an analysed map may have."""


def check_map(image, *, name: str = "map", min_side: int = MIN_SIDE) -> np.ndarray:
    """Return ``image`` as a finite 2-D float64 array, or raise :class:`ValueError` saying what is wrong.

    Parameters
    ----------
    image : array_like
        The map, shape (H, W).
    name : str
        How to call the array in error messages.
    min_side : int
        Smallest allowed H and W.

    Returns
    -------
    numpy.ndarray
        ``image`` as float64 (a copy only if a conversion was needed).

    Examples
    --------
    >>> check_map([[0, 1, 0], [1, 2, 1], [0, 1, 0]]).dtype
    dtype('float64')
    """
    array = np.asarray(image)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise ValueError(f"{name} must be real, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (H, W), got shape {array.shape}")
    if array.shape[0] < min_side or array.shape[1] < min_side:
        raise ValueError(f"{name} must be at least {min_side}x{min_side}, got shape {array.shape}")
    array = array.astype(np.float64, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        n_nan = int(np.isnan(array).sum())
        n_inf = int(bad.shape[0] - n_nan)
        y, x = (int(v) for v in bad[0])
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite values (first at (y, x) = ({y}, {x})); "
            "ERF maps must be finite: reject the images whose gradients were not finite and re-accumulate"
        )
    return array


def check_distribution(image, *, name: str = "map", min_side: int = MIN_SIDE) -> np.ndarray:
    """Like :func:`check_map`, and also refuse negative values (for measures that treat the map as a distribution).

    Raises
    ------
    ValueError
        If the map is not finite, not 2-D, too small, or has a negative value.
    """
    array = check_map(image, name=name, min_side=min_side)
    if array.size and array.min() < 0:
        raise ValueError(
            f"{name} has negative values (min {array.min():.3g}); distribution measures need a non-negative map: "
            "clip it (np.clip(map, 0, None)) or take its magnitude first"
        )
    return array


def _border_band(image: np.ndarray, width: int) -> np.ndarray:
    height, w = image.shape
    width = max(1, min(width, height // 2, w // 2))
    mask = np.zeros(image.shape, dtype=bool)
    mask[:width, :] = True
    mask[-width:, :] = True
    mask[:, :width] = True
    mask[:, -width:] = True
    return image[mask]


def estimate_floor(image, *, method: str = "border", band: int | None = None, percentile: float = 1.0) -> float:
    """Estimate the low background level ("floor") of an ERF map.

    Parameters
    ----------
    image : array_like, shape (H, W)
        The map (finite).
    method : {"border", "percentile"}
        ``"border"``: the median of a border band ``band`` pixels wide (default ``max(1, min(H, W) // 32)``).
        ``"percentile"``: the ``percentile``-th percentile of all pixels.
    band : int, optional
        Width of the border band in pixels.
    percentile : float
        Percentile used by ``method="percentile"``.

    Returns
    -------
    float
        The floor, never below the map's minimum. For a map that decays to zero inside the canvas it is 0; for a
        Gaussian whose tails reach the border it includes those tails (a truncated Gaussian cannot be told from a
        floor at the border).

    Examples
    --------
    >>> estimate_floor(np.pad(np.ones((3, 3)), 4) + 0.5)
    0.5
    """
    array = check_map(image)
    if method == "border":
        width = band if band is not None else max(1, min(array.shape) // 32)
        if width < 1:
            raise ValueError(f"band must be >= 1, got {width}")
        return float(np.median(_border_band(array, int(width))))
    if method == "percentile":
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        return float(np.percentile(array, percentile))
    raise ValueError(f"unknown floor method {method!r}; use 'border' or 'percentile'")


def remove_floor(image, floor: float) -> np.ndarray:
    """Return ``max(image - floor, 0)`` as float64 (the floor-removed map M⁺ of agd-metrics.md §0)."""
    array = check_map(image)
    if not np.isfinite(floor):
        raise ValueError(f"floor must be finite, got {floor}")
    return np.maximum(array - float(floor), 0.0)


def normalise(image) -> np.ndarray:
    """Return the map divided by its sum (a distribution p summing to 1).

    Raises
    ------
    ValueError
        If the map has negative values or sums to zero (an empty map has no distribution).
    """
    array = check_distribution(image)
    total = array.sum()
    if not total > 0:
        raise ValueError("the map sums to zero (empty map): it cannot be normalised")
    return array / total


def block_reduce(image, factor: int, *, how: str = "mean") -> np.ndarray:
    """Reduce a map by non-overlapping ``factor`` × ``factor`` blocks.

    Rows and columns beyond the last whole block are dropped. Block (i, j) covers pixels
    ``[i·f, (i+1)·f) × [j·f, (j+1)·f)``; its centre lies at ``i·f + (f−1)/2`` in full-resolution coordinates.
    A block mean of a Gaussian with covariance Σ is (to within sampling error) a Gaussian with covariance
    Σ + (f²−1)/12 · I, in full-resolution pixels.

    Parameters
    ----------
    image : array_like, shape (H, W) or (N, H, W)
        Map or stack of maps.
    factor : int
        Block side (1 returns the input unchanged).
    how : {"mean", "sum"}
        Reduction inside a block.

    Returns
    -------
    numpy.ndarray, shape (H // f, W // f) or (N, H // f, W // f)
    """
    array = np.asarray(image)
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if array.ndim not in (2, 3):
        raise ValueError(f"block_reduce needs a 2-D map or a 3-D stack, got shape {array.shape}")
    if how not in ("mean", "sum"):
        raise ValueError(f"how must be 'mean' or 'sum', got {how!r}")
    if factor == 1:
        return array
    h, w = array.shape[-2] // factor, array.shape[-1] // factor
    if h < 1 or w < 1:
        raise ValueError(f"factor {factor} is larger than the map {array.shape[-2:]}")
    trimmed = array[..., : h * factor, : w * factor]
    blocks = trimmed.reshape(*array.shape[:-2], h, factor, w, factor)
    reduced = blocks.sum(axis=(-3, -1), dtype=np.float64)
    return reduced / (factor * factor) if how == "mean" else reduced
