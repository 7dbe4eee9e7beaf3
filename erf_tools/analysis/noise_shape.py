"""The shape of a mean map's pixel noise: how far (M_j − m_j)/s_j is from a standard normal at N images.

The noise-free score (:mod:`.noise_free`) needs E max(x + e, 0) and E √max(x + e, 0) for the noise e of a pixel of the
mean of N per-image maps. With a normal e (the central limit theorem) these are closed form. Real per-image ERF maps are
far from normal: a ReLU'd gradient is 0 in about half of the images and heavy-tailed in the rest (an ImageNet-trained
EfficientNet-Lite1 under the Kim protocol: per-image skewness 3.3, kurtosis 20 at the centre pixel), so at 8–32 images
the mean of a pixel is strongly right-skewed, its typical value lies below its mean, and E √M is much lower than the
normal approximation says (at 8 images the normal formula removes a third of the √ bias of the normaliser-weighted sum
U). The CLT is then a poor model; the per-image maps themselves are a good one.

**Estimator (a pooled, standardised noise distribution).** Every pixel's per-image values are modelled as
m_j + σ_j ξ with a standardised distribution ξ (mean 0, variance 1) shared by the pixels of one of
:data:`LEVEL_BINS` quantile bins of the per-image signal-to-noise ratio ρ = smoothed mean / σ_j (a ReLU'd map is
clipped in most images where ρ is small, rarely where it is large), and σ_j the per-image s.d.
The map of σ_j² is the per-pixel sample variance smoothed by a Gaussian of :data:`VARIANCE_SMOOTHING` px (a pixel's
own variance from a few heavy-tailed values is mostly luck: without the smoothing its standardised residuals are
bounded by (N − 1)/√N and the tail the estimator needs is cut off). ξ is the pool of the standardised residuals
(X_ij − M_j)/σ_j of the bin's pixels and all images (subsampled to :data:`POOL_SIZE` in all), re-standardised. The
noise of the mean of N images is then s_j Z_N with Z_N = √N · mean of N draws of ξ, whose distribution is
simulated once (:data:`DRAWS` means, a fixed seed) and tabulated as the two expectations on the grid of k = x/s. For N above
:data:`MAX_SIMULATED_IMAGES` the normal formula is used (the skewness of Z_N, γ/√N, is then below ≈ 0.2 for the
maps above, and the two agree to < 0.002 in the score on them); below :data:`MIN_SIMULATED_IMAGES` too (the
per-pixel variances of 2–7 images are too rough to standardise by).

This keeps what the central limit theorem gets right (it is the N → ∞ limit of the simulation) and replaces what it
gets wrong at small N by the shape the images show; the shared-shape assumption is what lets a few images speak for
the tail (N × pixels residuals instead of N). It does not model spatial correlation (each expectation is per pixel,
where correlation does not enter) nor a shape that varies across the map other than with ρ.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import ndtr

__all__ = ["NoiseShape", "noise_shape_from_stack", "normal_noise_shape", "expected_positive_part",
           "expected_sqrt_positive", "VARIANCE_SMOOTHING", "POOL_SIZE", "DRAWS",
           "MAX_SIMULATED_IMAGES", "MIN_SIMULATED_IMAGES", "LEVEL_BINS", "smoothed_standard_error"]

VARIANCE_SMOOTHING = 3.0
"""σ (px of the per-image maps) of the Gaussian smoothing of the per-pixel variance before standardising."""

POOL_SIZE = 1 << 18
"""Standardised residuals kept in the pool (a seeded subsample of all pixels × images)."""

DRAWS = 1 << 14
"""Simulated means Z_N behind each table row."""

LEVEL_BINS = 4
"""Quantile bins of the per-image signal-to-noise ratio, one noise shape each."""

MAX_SIMULATED_IMAGES = 256
"""Above this many images the noise of the mean is taken as normal."""

MIN_SIMULATED_IMAGES = 8
"""Below this many images the per-pixel variances are too rough to standardise by: the normal shape is used."""

# k = x/s: dense where the expectations bend (|k| ≲ 5), sparse where they are ≈ 0 or ≈ √k
_GRID = np.unique(np.concatenate([np.linspace(-20.0, -5.0, 31), np.linspace(-5.0, 10.0, 301),
                                  np.geomspace(10.0, 60.0, 60)]))

_K_MAX = 40.0
_K_GRID = np.linspace(-10.0, _K_MAX, 5001)


def _tabulate_sqrt_positive() -> np.ndarray:
    """F(k) = E √max(k + Z, 0), Z ~ N(0, 1), on :data:`_K_GRID` (Gauss–Legendre on z ∈ [−k, −k + 60])."""
    nodes, weights = np.polynomial.legendre.leggauss(400)
    out = np.empty_like(_K_GRID)
    for i, k in enumerate(_K_GRID):
        lo = max(-k, -12.0)
        hi = max(lo + 1e-9, 12.0)
        # substitute z = lo + u², which removes the √ singularity at z = −k
        umax = np.sqrt(hi - lo)
        u = 0.5 * umax * (nodes + 1.0)
        z = lo + u * u
        f = np.sqrt(np.maximum(k + z, 0.0)) * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi) * 2 * u
        out[i] = 0.5 * umax * float(np.dot(weights, f))
    return out


_F_TABLE = _tabulate_sqrt_positive()


def expected_positive_part(x, sigma) -> np.ndarray:
    """E max(x + σZ, 0) for Z ~ N(0, 1), elementwise (σ = 0 gives max(x, 0)).

    Examples
    --------
    >>> round(float(expected_positive_part(0.0, 1.0)), 6)  # 1/√(2π)
    0.398942
    """
    x = np.asarray(x, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)
    k = x / safe
    value = x * ndtr(k) + safe * np.exp(-0.5 * k * k) / np.sqrt(2 * np.pi)
    return np.where(sigma > 0, value, np.maximum(x, 0.0))


def expected_sqrt_positive(x, sigma) -> np.ndarray:
    """E √max(x + σZ, 0) for Z ~ N(0, 1), elementwise (σ = 0 gives √max(x, 0)).

    Tabulated in k = x/σ on [−10, 40]; beyond, 0 below and the expansion √x (1 − 1/(8k²) − 15/(128k⁴)) above.

    Examples
    --------
    >>> round(float(expected_sqrt_positive(0.0, 1.0)), 4)  # 2^(1/4) Γ(3/4) / (2√π)
    0.4111
    """
    x = np.asarray(x, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)
    k = x / safe
    inside = np.interp(k, _K_GRID, _F_TABLE) * np.sqrt(safe)
    kk = np.maximum(k, 1.0)
    tail = np.sqrt(np.maximum(x, 0.0)) * (1.0 - 1.0 / (8 * kk * kk) - 15.0 / (128 * kk**4))
    value = np.where(k > _K_MAX, tail, np.where(k < _K_GRID[0], 0.0, inside))
    return np.where(sigma > 0, value, np.sqrt(np.maximum(x, 0.0)))




@dataclass(frozen=True)
class NoiseShape:
    """Tabulated E max(k + Z_N, 0) and E √max(k + Z_N, 0) for the standardised noise Z_N of an N-image mean.

    One table row per bin of the per-image signal-to-noise ratio ρ = mean / per-image s.d. (``level_edges``, the
    inner edges between bins): a ReLU'd map is zero in most images where ρ is small and rarely where it is large, so
    the shape differs between the background and the ERF. ``source`` is ``"per-image residuals"`` (simulated from the
    pooled residuals, module docstring) or ``"normal"``; ``skewness`` and ``excess_kurtosis`` describe Z_N over all
    pixels (0 and 0 for the normal), ``residual_skewness`` the pooled per-image ξ.
    """

    num_images: int
    source: str
    grid: np.ndarray
    positive_part: np.ndarray
    sqrt_positive: np.ndarray
    level_edges: tuple[float, ...] = ()
    skewness: float = 0.0
    excess_kurtosis: float = 0.0
    residual_skewness: float = float("nan")

    @property
    def is_normal(self) -> bool:
        return self.source == "normal"

    def level_of(self, mean, sigma, smoothing: float = VARIANCE_SMOOTHING) -> np.ndarray:
        """ρ = mean / (σ √N) for a mean map (smoothed by ``smoothing`` px, as when the table was built) and the
        standard error σ of its pixels."""
        mean = np.asarray(mean, dtype=np.float64)
        if smoothing > 0 and mean.ndim == 2:
            mean = gaussian_filter(mean, smoothing, mode="nearest")
        sigma = np.asarray(sigma, dtype=np.float64) * np.sqrt(self.num_images)
        return np.divide(mean, sigma, out=np.full(np.broadcast(mean, sigma).shape, np.inf), where=sigma > 0)

    def expected_positive_part(self, x, sigma, level=None) -> np.ndarray:
        """E max(x + σ Z_N, 0), elementwise (σ = 0 gives max(x, 0)); ``level`` ρ selects the table row."""
        return self._expect(x, sigma, self.positive_part, 1.0, level)

    def expected_sqrt_positive(self, x, sigma, level=None) -> np.ndarray:
        """E √max(x + σ Z_N, 0), elementwise (σ = 0 gives √max(x, 0)); ``level`` ρ selects the table row."""
        return self._expect(x, sigma, self.sqrt_positive, 0.5, level)

    def _expect(self, x, sigma, table, power, level):
        x = np.asarray(x, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        safe = np.where(sigma > 0, sigma, 1.0)
        k = x / safe
        rows = np.atleast_2d(table)
        if rows.shape[0] == 1 or level is None:
            which = np.zeros(np.broadcast(x, sigma).shape, dtype=int)
        else:
            which = np.broadcast_to(np.digitize(np.asarray(level, dtype=np.float64), self.level_edges),
                                    np.broadcast(x, sigma).shape)
        inside = np.zeros(np.broadcast(k, which).shape)
        kb = np.broadcast_to(k, inside.shape)
        for row in range(rows.shape[0]):
            member = which == row
            if member.any():
                inside[member] = np.interp(kb[member], self.grid, rows[row])
        inside = inside * safe**power
        value = np.where(k > self.grid[-1], np.maximum(x, 0.0) ** power, np.where(k < self.grid[0], 0.0, inside))
        return np.where(sigma > 0, value, np.maximum(x, 0.0) ** power)

    def to_dict(self) -> dict:
        return {"source": self.source, "num_images": self.num_images, "skewness": self.skewness,
                "excess_kurtosis": self.excess_kurtosis, "residual_skewness": self.residual_skewness,
                "level_edges": list(self.level_edges), "variance_smoothing_px": VARIANCE_SMOOTHING}


def smoothed_standard_error(standard_error, smoothing: float = VARIANCE_SMOOTHING) -> np.ndarray:
    """√(variance map smoothed by a Gaussian of ``smoothing`` px): the per-pixel scale of the noise shape."""
    s = np.asarray(standard_error, dtype=np.float64)
    if not smoothing > 0 or s.ndim != 2:
        return s
    return np.sqrt(np.maximum(gaussian_filter(s * s, smoothing, mode="nearest"), 0.0))


def _moments(values: np.ndarray) -> tuple[float, float]:
    centred = values - values.mean()
    var = float((centred * centred).mean())
    if not var > 0:
        return 0.0, 0.0
    return float((centred**3).mean() / var**1.5), float((centred**4).mean() / var**2 - 3.0)


def noise_shape_from_stack(stack, *, smoothing: float = VARIANCE_SMOOTHING, seed: int = 0) -> NoiseShape:
    """The noise shape of the mean of a (N, h, w) stack of per-image maps (module docstring).

    Falls back to the normal shape for N > :data:`MAX_SIMULATED_IMAGES`, N < :data:`MIN_SIMULATED_IMAGES`, or a
    stack without variance.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> shape = noise_shape_from_stack(np.maximum(rng.standard_normal((8, 32, 32)), 0.0))
    >>> shape.source, shape.skewness > 0.2
    ('per-image residuals', True)
    """
    data = np.asarray(stack, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"per-image maps must have shape (N, H, W), got {data.shape}")
    n = int(data.shape[0])
    if n < MIN_SIMULATED_IMAGES or n > MAX_SIMULATED_IMAGES:
        return normal_noise_shape(max(n, 1))
    mean = data.mean(axis=0)
    variance = data.var(axis=0, ddof=1)
    sd = np.sqrt(np.maximum(gaussian_filter(variance, smoothing, mode="nearest"), 0.0)) if smoothing > 0 else \
        np.sqrt(variance)
    usable = sd > 1e-12 * max(float(sd.max()), 1e-300)
    if not usable.any():
        return normal_noise_shape(n)
    rng = np.random.default_rng(seed)
    pixels = np.flatnonzero(usable.ravel())
    # ρ from the smoothed mean: binning by a pixel's own mean would select its residuals (an outlier raises both)
    smooth_mean = gaussian_filter(mean, smoothing, mode="nearest") if smoothing > 0 else mean
    level = smooth_mean.ravel()[pixels] / sd.ravel()[pixels]
    edges = np.unique(np.quantile(level, np.linspace(0, 1, LEVEL_BINS + 1)[1:-1]))
    flat = data.reshape(n, -1)
    per_bin = POOL_SIZE // (edges.size + 1)
    positive_rows, root_rows, all_z, all_xi = [], [], [], []
    for members in _bins(pixels, np.digitize(level, edges), edges.size + 1):
        if members.size * n > per_bin:
            images, chosen = rng.integers(0, n, per_bin), members[rng.integers(0, members.size, per_bin)]
            residuals = (flat[images, chosen] - mean.ravel()[chosen]) / sd.ravel()[chosen]
        else:
            residuals = ((flat[:, members] - mean.ravel()[members]) / sd.ravel()[members]).ravel()
        spread = residuals.std() if residuals.size else 0.0
        if not spread > 0:
            return normal_noise_shape(n)
        xi = (residuals - residuals.mean()) / spread
        z = _simulated_means(xi, n, rng)
        positive, root = _tables(z)
        positive_rows.append(positive)
        root_rows.append(root)
        all_z.append(z)
        all_xi.append(xi)
    skew, kurt = _moments(np.concatenate(all_z))
    return NoiseShape(n, "per-image residuals", _GRID, np.array(positive_rows), np.array(root_rows),
                      tuple(float(e) for e in edges), skew, kurt, _moments(np.concatenate(all_xi))[0])


def _bins(pixels: np.ndarray, which: np.ndarray, count: int):
    for row in range(count):
        yield pixels[which == row]


def _simulated_means(xi: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted √N · (mean of N draws of ξ), :data:`DRAWS` of them."""
    means = np.empty(DRAWS)
    chunk = max(1, (1 << 22) // n)  # bound the memory of the index draws
    for start in range(0, DRAWS, chunk):
        stop = min(DRAWS, start + chunk)
        means[start:stop] = xi[rng.integers(0, xi.size, (stop - start, n))].mean(axis=1)
    return np.sort(means * np.sqrt(n))


def _tables(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E max(k + z, 0) and E √max(k + z, 0) over the sorted sample z, for every k of the grid."""
    r = z.size
    tail_sum = np.concatenate([np.cumsum(z[::-1])[::-1], [0.0]])  # Σ_{i ≥ idx} z_i
    idx = np.searchsorted(z, -_GRID, side="right")
    positive = (tail_sum[idx] + _GRID * (r - idx)) / r
    root = np.empty_like(_GRID)
    for start in range(0, _GRID.size, 64):
        block = _GRID[start:start + 64, None] + z[None, :]
        root[start:start + 64] = np.sqrt(np.maximum(block, 0.0)).mean(axis=1)
    return positive, root


def normal_noise_shape(num_images: int) -> NoiseShape:
    """The normal shape (the central limit theorem), tabulated on the same grid."""
    return NoiseShape(int(num_images), "normal", _GRID, expected_positive_part(_GRID, 1.0),
                      expected_sqrt_positive(_GRID, 1.0))
