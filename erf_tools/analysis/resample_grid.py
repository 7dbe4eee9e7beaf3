"""The reduced grid on which image resamples are scored (the bootstrap of :func:`~erf_tools.analysis.analyze`).

A resample's mean map is formed from the per-image maps block-summed to at most 4·``bootstrap_side`` px per side and
fitted from the full-resolution fit carried to that grid (:func:`resample_grid`, :func:`grid_fit`), so that hundreds
of resamples of a 1024 px map cost seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .gaussian_fit import GaussianFit, fit_gaussian
from .moments import ellipse_from_covariance
from .maps import block_reduce, estimate_floor

__all__ = ["ResampleGrid", "resample_grid", "grid_fit", "map_units_factor", "usable"]


def map_units_factor(data, stack, down: int) -> float | None:
    """Factor from the per-image maps' units to the map's (per-image maps are not normalised like the map: Kim et al.
    normalise the mean to sum 1); None when the per-image maps are all 0."""
    h, w = stack.shape[1:]
    total = float(stack.mean(axis=0).sum())
    return float(data[: h * down, : w * down].sum()) / total if total > 0 else None


@dataclass(frozen=True)
class ResampleGrid:
    """The grid on which image resamples are fitted: ``stored`` (per-image maps block-summed by ``first``, in blocks
    of ``factor`` map pixels), ``to_map_units`` (block sums → per-pixel map units), ``added`` (the blocks' variance,
    (f² − 1)/12 px²) and ``init``, the full-resolution fit carried to the grid."""

    stored: np.ndarray
    first: int
    factor: int
    to_map_units: float
    added: float
    init: GaussianFit | None

    def mean_map(self, block_sums: np.ndarray) -> np.ndarray:
        """A mean of ``stored`` maps in per-pixel map units."""
        return block_sums * self.to_map_units


def resample_grid(data, stack, down: int, fit: GaussianFit, bootstrap_side: int) -> ResampleGrid:
    """The :class:`ResampleGrid` for a map ``data`` and its (N, h, w) per-image ``stack`` in blocks of ``down``."""
    first = max(1, int(np.ceil(max(stack.shape[1:]) / (4 * bootstrap_side))))
    stored = block_reduce(stack, first, how="sum")  # block sums over factor² map pixels
    factor = down * first
    units = map_units_factor(data, stored, factor)
    added = (factor * factor - 1) / 12.0
    init = None
    if np.isfinite(fit.sigma_major) and fit.sigma_minor > 0 and fit.amplitude > 0:
        blurred = fit.covariance + added * np.eye(2)
        major, minor, theta = ellipse_from_covariance(blurred / factor**2)
        amp = fit.amplitude * math.sqrt(np.linalg.det(fit.covariance) / np.linalg.det(blurred))
        init = GaussianFit(amplitude=amp, offset=fit.offset,
                           centre=tuple((c - (factor - 1) / 2) / factor for c in fit.centre),
                           sigma_major=major, sigma_minor=minor, theta=theta, r_squared=fit.r_squared, rmse=fit.rmse,
                           converged=True)
    return ResampleGrid(stored, first, factor, (1.0 if units is None else units) / factor**2, added, init)


def grid_fit(m: np.ndarray, grid: ResampleGrid, *, floor, floor_value: float, bootstrap_side: int,
             r_squared_threshold: float) -> tuple[GaussianFit, float]:
    """(fit, floor) of a resample's mean map ``m`` on the grid, started from the full-resolution fit."""
    f_floor = estimate_floor(m, method=floor) if isinstance(floor, str) else floor_value
    g = fit_gaussian(m, floor=f_floor, init=grid.init, restarts=grid.init is None, max_fit_side=bootstrap_side,
                     refine_side=bootstrap_side, r_squared_threshold=r_squared_threshold, max_nfev=100)
    return g, f_floor


def usable(g: GaussianFit) -> bool:
    """Whether a fit has finite parameters and a positive amplitude and width."""
    return bool(g.amplitude > 0 and np.isfinite(g.sigma_major) and g.sigma_minor > 0 and all(np.isfinite(g.centre)))
