"""Spread of an ERF as areas and radii (agd-metrics.md §1.7, §1.9; erf-protocols.md §2, §4).

* :func:`area_ratio` — RepLKNet's high-contribution area ratio r(t), exactly as ``analyze_erf.py`` computes it
  (``log10(x+1)/max``, centred odd squares, strict ``>``), with an explicit "unreachable" result instead of ``None``.
* :func:`rank_area` — centre-free: the fewest pixels, taken brightest first, holding a fraction t of the mass.
* :func:`effective_area` — exp(entropy): the number of pixels of a uniform map with the same entropy.
* :func:`radial_cumulative_mass` — mass within radii about a centre (OpenERF's metric about (H//2, W//2)).
* :func:`mass_radius` — the smallest radius about a centre holding a fraction t of the mass.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .maps import check_distribution

__all__ = [
    "AREA_THRESHOLDS",
    "OPENERF_RADII",
    "AreaRatio",
    "area_ratio",
    "rank_area",
    "rank_area_sorted",
    "effective_area",
    "EffectiveArea",
    "radial_cumulative_mass",
    "mass_radius",
]

AREA_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
"""RepLKNet's thresholds t."""

OPENERF_RADII = (5, 10, 20, 30, 40, 60, 80)
"""OpenERF's radii (pixels) for the radial cumulative mass."""


@dataclass(frozen=True)
class AreaRatio:
    """r(t) for one threshold: the side of the smallest qualifying square and side²/(H·W); both None if unreachable."""

    threshold: float
    side: int | float | None
    ratio: float | None
    fraction: float | None
    centre: tuple[int, int]
    transform: str

    @property
    def reachable(self) -> bool:
        return self.side is not None

    @property
    def percent(self) -> float | None:
        return None if self.ratio is None else 100.0 * self.ratio

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "side": self.side, "ratio": self.ratio, "percent": self.percent,
                "fraction": self.fraction, "reachable": self.reachable, "centre_yx": list(self.centre),
                "transform": self.transform}


def _transform(data: np.ndarray, transform: str) -> np.ndarray:
    if transform == "log10":
        out = np.log10(data + 1.0)
    elif transform == "none":
        out = data
    else:
        raise ValueError(f"unknown transform {transform!r}; use 'log10' (RepLKNet) or 'none'")
    top = out.max()
    return out / top if top > 0 else np.zeros_like(out)


def area_ratio(image, thresholds=AREA_THRESHOLDS, *, centre: tuple[float, float] | None = None,
               transform: str = "log10", interpolate: bool = False) -> tuple[AreaRatio, ...]:
    """RepLKNet's high-contribution area ratio r(t) (erf-protocols.md §2).

    D = log10(M + 1) / max (``transform="log10"``, the official one) or M / max (``"none"``). For i = 1, 2, …, the
    square ``D[cy−i : cy+i+1, cx−i : cx+i+1]`` (side s = 2i+1) is tested; the first whose sum divided by ΣD is
    strictly greater than t gives side s and ratio (s/H)·(s/W). The official centre is (H//2, W//2) and i stops at
    H//2 − 1, so row 0 and column 0 are never inside a square; for another centre i stops where the square would
    reach row/column 0 or leave the canvas on the other side (which reproduces the official limit at the default
    centre). A threshold no square exceeds is returned with ``side=None`` ("unreachable"), never an exception.

    Parameters
    ----------
    image : array_like, shape (H, W)
        Non-negative map (the log transform is not scale invariant: pass the map in the units the protocol defines).
    thresholds : sequence of float
        Fractions t in (0, 1].
    centre : (y, x), optional
        Square centre, rounded to the nearest pixel (halves up); default (H//2, W//2).
    transform : {"log10", "none"}
    interpolate : bool
        Not the official value: the side is interpolated linearly in the covered fraction between the last square
        at or below t and the first above it, giving a continuous r(t) (used to measure its spread on block-reduced
        maps, where whole sides are too coarse).

    Returns
    -------
    tuple of AreaRatio

    Examples
    --------
    >>> [r.side for r in area_ratio(np.ones((1024, 1024)))]
    [459, 561, 725, 1019]
    """
    data = check_distribution(image)
    height, width = data.shape
    if centre is None:
        cy, cx = height // 2, width // 2
    else:
        if not all(np.isfinite(centre)):
            raise ValueError(f"centre must be finite, got {centre}")
        cy, cx = (int(np.floor(float(c) + 0.5)) for c in centre)
    d = _transform(data, transform)
    total = float(d.sum())
    i_max = min(cy - 1, cx - 1, height - 1 - cy, width - 1 - cx)
    fractions = np.zeros(0)
    if total > 0 and i_max >= 1:
        # the square of half-side i holds exactly the pixels at Chebyshev distance ≤ i from the centre
        shells = np.bincount(_chebyshev(height, width, cy, cx), weights=d.ravel())
        fractions = np.cumsum(shells)[1: i_max + 1] / total
    out = []
    for t in thresholds:
        t = float(t)
        if not 0 < t <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
        hits = np.nonzero(fractions > t)[0]
        if hits.size == 0:
            out.append(AreaRatio(t, None, None, None, (cy, cx), transform))
            continue
        i = int(hits[0]) + 1
        side = 2 * i + 1
        if interpolate:
            below = float(fractions[hits[0] - 1]) if hits[0] > 0 else 0.0
            above = float(fractions[hits[0]])
            side = side - 2 * (above - t) / (above - below) if above > below else float(side)
        out.append(AreaRatio(t, side, (side / height) * (side / width), float(fractions[hits[0]]), (cy, cx),
                             transform))
    return tuple(out)


@lru_cache(maxsize=4)
def _chebyshev(height: int, width: int, cy: int, cx: int) -> np.ndarray:
    """max(|y − cy|, |x − cx|) for every pixel, flattened (read-only, cached: the bootstrap reuses it)."""
    dy = np.abs(np.arange(height) - cy)
    dx = np.abs(np.arange(width) - cx)
    out = np.maximum(dy[:, None], dx[None, :]).ravel()
    out.flags.writeable = False
    return out


def rank_area(image, thresholds=(0.5,), *, floor: float = 0.0) -> tuple[float, ...]:
    """Centre-free area: the fewest pixels, brightest first, whose mass reaches t·total, divided by H·W.

    Parameters
    ----------
    image : array_like, shape (H, W)
        Non-negative map.
    thresholds : sequence of float
        Mass fractions t in (0, 1].
    floor : float
        Measure max(image − floor, 0) instead (the order of the pixels is the same, so one sort serves both).

    Returns
    -------
    tuple of float
        One ratio per threshold (NaN for an all-zero map).

    Examples
    --------
    >>> rank_area([[4, 0, 0], [0, 3, 0], [0, 0, 3]], (0.4, 0.5, 1.0))
    (0.1111111111111111, 0.2222222222222222, 0.3333333333333333)
    """
    data = check_distribution(image)
    return rank_area_sorted(np.sort(data.ravel())[::-1], thresholds, floor=floor)


def rank_area_sorted(descending: np.ndarray, thresholds=(0.5,), *, floor: float = 0.0) -> tuple[float, ...]:
    """:func:`rank_area` from the map's values already sorted in descending order."""
    values = np.maximum(np.asarray(descending, dtype=np.float64) - floor, 0.0)
    cumulative = np.cumsum(values)
    total = cumulative[-1] if values.size else 0.0
    out = []
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
        if not total > 0:
            out.append(float("nan"))
            continue
        n = int(np.searchsorted(cumulative, t * total * (1 - 1e-12), side="left")) + 1
        out.append(min(n, values.size) / values.size)
    return tuple(out)


@dataclass(frozen=True)
class EffectiveArea:
    """exp(entropy) of the normalised map and derived quantities (see :func:`effective_area`)."""

    area: float
    ratio: float
    sigma: float
    entropy: float


def effective_area(image) -> EffectiveArea:
    """Effective area A_eff = exp(H(p)), H(p) = −Σ p ln p (0·ln 0 = 0), agd-metrics.md §1.9.

    Returns
    -------
    EffectiveArea
        ``area`` in pixels (N for a uniform map over N pixels; ≈ 2πe·σx·σy for a well-sampled Gaussian),
        ``ratio`` = area / (H·W), ``sigma`` = √(area / 2πe) (Gaussian-equivalent σ), and the entropy (nats).
        NaN for an all-zero map.

    Examples
    --------
    >>> round(effective_area(np.ones((4, 5))).area, 9)
    20.0
    """
    data = check_distribution(image)
    total = data.sum()
    if not total > 0:
        nan = float("nan")
        return EffectiveArea(nan, nan, nan, nan)
    p = data[data > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    area = float(np.exp(entropy))
    return EffectiveArea(area=area, ratio=area / data.size, sigma=float(np.sqrt(area / (2 * np.pi * np.e))),
                         entropy=entropy)


def _distance(shape, centre) -> np.ndarray:
    cy, cx = float(centre[0]), float(centre[1])
    return np.sqrt((np.arange(shape[0]) - cy)[:, None] ** 2 + (np.arange(shape[1]) - cx)[None, :] ** 2)


def radial_cumulative_mass(image, centre: tuple[float, float] | None = None,
                           radii=OPENERF_RADII) -> dict[float, float]:
    """Fraction of the mass within each radius (Euclidean distance ≤ r) of ``centre``.

    The default centre (H//2, W//2) and radii reproduce OpenERF's ``radial_cumulative_mass``.

    Returns
    -------
    dict
        radius → fraction (NaN for an all-zero map).
    """
    data = check_distribution(image)
    if centre is None:
        centre = (data.shape[0] // 2, data.shape[1] // 2)
    total = float(data.sum())
    dist = _distance(data.shape, centre)
    return {r: (float(data[dist <= r].sum()) / total if total > 0 else float("nan")) for r in radii}


def mass_radius(image, centre: tuple[float, float], thresholds=(0.5,)) -> tuple[float, ...]:
    """Smallest radius r about ``centre`` such that the pixels within distance ≤ r hold at least t of the mass.

    Returns
    -------
    tuple of float
        One radius per threshold (NaN for an all-zero map).
    """
    data = check_distribution(image)
    total = float(data.sum())
    dist = _distance(data.shape, centre).ravel()
    values = data.ravel()
    # 1-px shells first, then an exact sort inside the shell where the cumulative mass crosses t·total
    shell = dist.astype(np.int64)
    shell_mass = np.cumsum(np.bincount(shell, weights=values))
    out = []
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
        if not total > 0:
            out.append(float("nan"))
            continue
        target = t * total * (1 - 1e-12)
        k = min(int(np.searchsorted(shell_mass, target, side="left")), shell_mass.size - 1)
        before = shell_mass[k - 1] if k > 0 else 0.0
        inside = np.nonzero(shell == k)[0]
        order = inside[np.argsort(dist[inside], kind="stable")]
        cumulative = before + np.cumsum(values[order])
        j = min(int(np.searchsorted(cumulative, target, side="left")), order.size - 1)
        out.append(float(dist[order[j]]))
    return tuple(out)
