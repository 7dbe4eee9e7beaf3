"""Moments of an ERF map treated as a distribution: centre of mass, covariance, moment ellipse (agd-metrics.md §1.2).

All positions are ``(y, x)`` with pixel centres at integers; covariance matrices are ordered ``[[yy, yx], [xy, xx]]``.
Orientations are angles of the major axis from the +x axis (columns) towards +y (rows, i.e. downwards on screen), in
radians in [0, π).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .maps import check_distribution

__all__ = ["Moments", "centre_of_mass", "covariance", "ellipse_from_covariance", "covariance_from_ellipse",
           "image_moments", "argmax_position"]


class EllipseSize:
    """Derived sizes of anything with ``sigma_major`` and ``sigma_minor`` (moment ellipses, fitted Gaussians)."""

    sigma_major: float
    sigma_minor: float

    @property
    def anisotropy(self) -> float:
        """σ_major / σ_minor (1 for an isotropic map; inf when σ_minor is 0)."""
        return self.sigma_major / self.sigma_minor if self.sigma_minor > 0 else float("inf")

    @property
    def sigma(self) -> float:
        """Geometric-mean σ, √(σ_major σ_minor)."""
        return float(np.sqrt(self.sigma_major * self.sigma_minor))


@dataclass(frozen=True)
class Moments(EllipseSize):
    """First and second moments of a non-negative map (see :func:`image_moments`)."""

    centre: tuple[float, float]
    covariance: np.ndarray
    sigma_major: float
    sigma_minor: float
    theta: float


def _total(array: np.ndarray) -> float:
    total = float(array.sum())
    if not total > 0:
        raise ValueError("the map sums to zero (empty map): its moments are undefined")
    return total


def centre_of_mass(image) -> tuple[float, float]:
    """Centre of mass ``(Σ p·y, Σ p·x)`` of a non-negative map, p = map / Σ map.

    Examples
    --------
    >>> centre_of_mass([[0, 0, 0], [0, 0, 1], [0, 0, 1]])
    (1.5, 2.0)
    """
    array = check_distribution(image, min_side=1)
    total = _total(array)
    y = float(array.sum(axis=1) @ np.arange(array.shape[0])) / total
    x = float(array.sum(axis=0) @ np.arange(array.shape[1])) / total
    return y, x


def covariance(image, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Second central moments of a non-negative map about ``centre`` (default: its centre of mass).

    Returns
    -------
    numpy.ndarray, shape (2, 2)
        ``[[Σ p (y−μy)², Σ p (y−μy)(x−μx)], [·, Σ p (x−μx)²]]``.
    """
    array = check_distribution(image, min_side=1)
    total = _total(array)
    cy, cx = centre_of_mass(array) if centre is None else (float(centre[0]), float(centre[1]))
    dy = np.arange(array.shape[0]) - cy
    dx = np.arange(array.shape[1]) - cx
    row = array.sum(axis=1)
    col = array.sum(axis=0)
    syy = float(row @ (dy * dy)) / total
    sxx = float(col @ (dx * dx)) / total
    syx = float(dy @ array @ dx) / total
    return np.array([[syy, syx], [syx, sxx]])


def ellipse_from_covariance(cov) -> tuple[float, float, float]:
    """(σ_major, σ_minor, θ) of a 2×2 covariance ordered ``[[yy, yx], [xy, xx]]``.

    θ is the angle of the major axis from +x towards +y, in [0, π). Negative eigenvalues (round-off) become 0.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (2, 2):
        raise ValueError(f"covariance must be 2x2, got shape {cov.shape}")
    syy, syx, sxx = cov[0, 0], 0.5 * (cov[0, 1] + cov[1, 0]), cov[1, 1]
    mean = 0.5 * (sxx + syy)
    half_diff = np.hypot(0.5 * (sxx - syy), syx)
    major = np.sqrt(max(mean + half_diff, 0.0))
    minor = np.sqrt(max(mean - half_diff, 0.0))
    theta = 0.5 * np.arctan2(2.0 * syx, sxx - syy) if half_diff > 0 else 0.0
    return float(major), float(minor), float(np.mod(theta, np.pi))


def covariance_from_ellipse(sigma_major: float, sigma_minor: float, theta: float) -> np.ndarray:
    """Inverse of :func:`ellipse_from_covariance`: the ``[[yy, yx], [xy, xx]]`` covariance of an ellipse."""
    c, s = np.cos(theta), np.sin(theta)
    a, b = sigma_major**2, sigma_minor**2
    sxx = a * c * c + b * s * s
    syy = a * s * s + b * c * c
    syx = (a - b) * s * c
    return np.array([[syy, syx], [syx, sxx]])


def image_moments(image, centre: tuple[float, float] | None = None) -> Moments:
    """Centre of mass, covariance and moment ellipse of a non-negative map.

    Parameters
    ----------
    image : array_like, shape (H, W)
        Non-negative map (raw or floor-removed; the caller states which).
    centre : (y, x), optional
        Centre for the second moments; default the centre of mass.

    Returns
    -------
    Moments

    Examples
    --------
    >>> m = image_moments(np.outer([1, 2, 1], [1, 2, 1]))
    >>> round(m.sigma_major ** 2, 6), m.centre
    (0.5, (1.0, 1.0))
    """
    array = check_distribution(image, min_side=1)
    com = centre_of_mass(array)
    about = com if centre is None else (float(centre[0]), float(centre[1]))
    cov = covariance(array, about)
    major, minor, theta = ellipse_from_covariance(cov)
    return Moments(centre=com if centre is None else about, covariance=cov, sigma_major=major, sigma_minor=minor,
                   theta=theta)


def argmax_position(image, *, smooth: float = 0.0) -> tuple[int, int]:
    """``(y, x)`` of the maximum, optionally after a Gaussian blur of ``smooth`` px (robust to single hot pixels)."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"argmax_position needs a non-empty 2-D map, got shape {array.shape}")
    if smooth > 0:
        from scipy.ndimage import gaussian_filter

        array = gaussian_filter(array, smooth, mode="nearest")
    y, x = np.unravel_index(int(np.argmax(array)), array.shape)
    return int(y), int(x)
