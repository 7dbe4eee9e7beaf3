"""Checkerboard (pixel-sensitivity imbalance) indices of Kim et al., PRL 2023 (agd-metrics.md §1.8).

    L1 = [Σ |R[y,x+1] − R[y,x]| + Σ |R[y+1,x] − R[y,x]|] / (H(W−1) + W(H−1))
    L2 = [Σ |R[y,x+2] − 2R[y,x+1] + R[y,x]| + Σ |R[y+2,x] − 2R[y+1,x] + R[y,x]|] / (H(W−2) + W(H−2))

PRL does not state how R is normalised; the reference table of agd-metrics.md §3 uses the map divided by its maximum,
which is the default here. Values on such maps (0.003–0.046) are not comparable with PRL's Table 3 (output-logit ERF).
"""
from __future__ import annotations

import numpy as np

from .maps import check_map

__all__ = ["checkerboard_indices"]


def checkerboard_indices(image, *, normalise: str = "max") -> tuple[float, float]:
    """First- and second-difference imbalance indices (L1, L2) of a map.

    Parameters
    ----------
    image : array_like, shape (H, W), H, W ≥ 3
    normalise : {"max", "sum", "none"}
        Divide the map by its maximum (default, as in the reference table), by its sum, or use it as is.

    Returns
    -------
    (float, float)
        L1 and L2 (NaN when the normalising value is 0).

    Examples
    --------
    >>> checkerboard_indices(np.ones((4, 4)))
    (0.0, 0.0)
    >>> checkerboard_indices(np.indices((4, 4)).sum(axis=0) % 2)
    (1.0, 2.0)
    """
    data = check_map(image)
    if normalise == "max":
        scale = float(np.abs(data).max())
    elif normalise == "sum":
        scale = float(data.sum())
    elif normalise == "none":
        scale = 1.0
    else:
        raise ValueError(f"normalise must be 'max', 'sum' or 'none', got {normalise!r}")
    if scale == 0 or not np.isfinite(scale):
        return float("nan"), float("nan")
    r = data / scale
    height, width = r.shape
    first = np.abs(np.diff(r, axis=1)).sum() + np.abs(np.diff(r, axis=0)).sum()
    second = np.abs(np.diff(r, n=2, axis=1)).sum() + np.abs(np.diff(r, n=2, axis=0)).sum()
    l1 = float(first) / (height * (width - 1) + width * (height - 1))
    l2 = float(second) / (height * (width - 2) + width * (height - 2))
    return l1, l2
