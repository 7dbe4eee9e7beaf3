"""Per-pixel noise of an ERF map: the standard error of each pixel of the mean map, and where it came from.

An ERF map is the mean of N per-image maps, so pixel j has standard error s_j = √(sample variance_j / N). Three ways
to know it, best first (``NoiseModel.source``):

* ``"per-image"`` — from the per-image statistics: the engine's accumulated second moments
  (``ERFResult.map_standard_error``), or a full-resolution stack of per-image maps;
* ``"per-image-blocks"`` — from per-image maps stored block-summed by f: the standard error of each block mean, times
  f (pixels inside a block taken as independent), spread over the block's pixels;
* ``"map-only"`` — a bare map (published maps, other tools' outputs): :func:`estimate_map_noise`.

**Map-only estimator.** The high-pass residual d = M − (mean of the 4 neighbours) removes a smooth ERF (to second
order) and keeps white noise with variance 1.25 s². Pixels are binned by the local level (the map smoothed by a
1.5 px Gaussian, 12 quantile bins) so that the noise may grow with the signal, as it does for ReLU'd gradients; in
each bin s = 1.4826·MAD(d)/√1.25, interpolated in the local level. Reliability: the relative error of a MAD scale from
n pixels is ≈ 1.17/√(2n); the estimator assumes pixel-independent noise, so the lag-1 autocorrelation of d is
checked against its white-noise value −0.4: noticeably above it (> −0.25) means spatially correlated noise or
unresolved structure, the noise is then under-estimated and the report says so (``map_noise_correlated``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from .maps import check_map

__all__ = ["NoiseModel", "standard_error_from_stack", "estimate_map_noise", "noise_model_from_standard_error",
           "MAP_NOISE_BINS", "gain_adjusted_stack", "gain_adjusted_standard_error"]

MAP_NOISE_BINS = 12
"""Quantile bins of the local level in the map-only noise estimator."""

_WHITE_LAG1 = -0.4  # lag-1 autocorrelation of d = ε − mean of 4 neighbours for white ε: (−¼ − ¼)/1.25


@dataclass(frozen=True)
class NoiseModel:
    """Per-pixel standard error of a map and its provenance (module docstring).

    ``standard_error`` has the map's shape and units. ``num_images`` is the number of images behind the map (None for
    map-only), ``num_independent_images`` the independent source images (None: the same). ``reliability`` describes
    how far the standard errors can be trusted (map-only: relative error and the correlation check).
    """

    standard_error: np.ndarray
    source: str
    num_images: int | None = None
    num_independent_images: int | None = None
    reliability: dict[str, Any] = field(default_factory=dict)

    @property
    def noise_model(self) -> str:
        """``"per-image"`` or ``"map-only"`` (the block variant counts as per-image)."""
        return "map-only" if self.source == "map-only" else "per-image"

    def to_dict(self) -> dict:
        s = self.standard_error
        return {"noise_model": self.noise_model, "source": self.source, "num_images": self.num_images,
                "num_independent_images": self.num_independent_images,
                "standard_error_median": float(np.median(s)), "standard_error_max": float(np.max(s)),
                "standard_error_rms": float(np.sqrt(np.mean(s * s))), "reliability": dict(self.reliability)}


def noise_model_from_standard_error(standard_error, shape: tuple[int, int], *, num_images: int | None = None,
                                    num_independent_images: int | None = None) -> NoiseModel:
    """Wrap a given per-pixel standard error (e.g. ``ERFResult.map_standard_error``) after checking it."""
    s = np.asarray(standard_error, dtype=np.float64)
    if s.shape != tuple(shape):
        raise ValueError(f"map_standard_error must have the map's shape {tuple(shape)}, got {s.shape}")
    if not np.all(np.isfinite(s)) or s.min() < 0:
        raise ValueError("map_standard_error must be finite and non-negative")
    return NoiseModel(s, "per-image", num_images, num_independent_images,
                      {"exact": True, "from": "per-image second moments"})


def gain_adjusted_stack(stack) -> np.ndarray:
    """The per-image maps without the part of their spread that only rescales the mean map or shifts its level.

    Each map is regressed on the mean map over the pixels, X_i ≈ α_i + γ_i·M, and X'_i = X_i − α_i − (γ_i − 1)·M: the
    same mean (the regression of M on itself is α = 0, γ = 1), and per-pixel variances of what is left. The AGD score,
    R², σ and the other shape numbers do not change when the map is multiplied by a constant, and the fitted offset
    takes up a constant: a per-image gain (one image's gradients all twice as strong, a common trait of ReLU
    networks' per-image maps) or level is noise of the raw map but not of its shape, and counting it over-corrects
    the noise bias. The offset matters as much as the gain: a background of clamped noise does not grow with the
    gain, and a gain-only adjustment (X_i − M·(S_i/S̄ − 1)) would make it look noisier than it is. A stack whose mean
    map is flat is returned as it is.
    """
    data = np.asarray(stack, dtype=np.float64)
    n = data.shape[0]
    flat = data.reshape(n, -1)
    mean = flat.mean(axis=0)
    centred = mean - mean.mean()
    spread = float(centred @ centred)
    if not spread > 0:
        return data
    gain = (flat - flat.mean(axis=1, keepdims=True)) @ centred / spread
    level = flat.mean(axis=1) - gain * mean.mean()
    return (flat - level[:, None] - (gain - 1.0)[:, None] * mean).reshape(data.shape)


def gain_adjusted_standard_error(standard_error, stack, adjusted, *, downsample: int = 1) -> np.ndarray:
    """A given per-pixel standard error (the engine's exact second moments) scaled by √(Var X'/Var X) of the
    per-image maps (:func:`gain_adjusted_stack`), per block of ``downsample`` px; 1 where the maps do not vary."""
    s = np.asarray(standard_error, dtype=np.float64)
    raw_var = np.asarray(stack, dtype=np.float64).var(axis=0)
    ratio = np.sqrt(np.divide(np.asarray(adjusted).var(axis=0), raw_var, out=np.ones_like(raw_var),
                              where=raw_var > 0))
    f = int(downsample)
    if f > 1:
        ratio = np.repeat(np.repeat(ratio, f, axis=0), f, axis=1)
    factor = np.pad(ratio, ((0, max(0, s.shape[0] - ratio.shape[0])), (0, max(0, s.shape[1] - ratio.shape[1]))),
                    mode="edge")[: s.shape[0], : s.shape[1]]
    return s * factor


def standard_error_from_stack(stack: np.ndarray, shape: tuple[int, int], *, downsample: int = 1,
                              to_map_units: float = 1.0) -> NoiseModel:
    """Per-pixel standard error of the mean map from a checked (N, h, w) stack of per-image maps.

    Parameters
    ----------
    stack : numpy.ndarray, shape (N, h, w)
        Per-image maps (block-summed by ``downsample``), N ≥ 2.
    shape : (H, W)
        Shape of the mean map.
    downsample : int
        Block side of the stack.
    to_map_units : float
        Factor from the stack's units (block sums) to the map's units of one block sum.
    """
    n = stack.shape[0]
    if n < 2:
        raise ValueError("a standard error needs at least two per-image maps")
    f = int(downsample)
    se_blocks = stack.std(axis=0, ddof=1) / np.sqrt(n) * float(to_map_units)
    if f == 1:
        se = np.zeros(shape)
        h, w = min(shape[0], se_blocks.shape[0]), min(shape[1], se_blocks.shape[1])
        se[:h, :w] = se_blocks[:h, :w]
        return NoiseModel(se, "per-image", n, None, {"exact": True, "from": "per-image maps"})
    # the SE of a block sum over f² independent pixels is f·s: the pixel SE is se_blocks / f
    per_pixel = np.repeat(np.repeat(se_blocks / f, f, axis=0), f, axis=1)
    se = np.pad(per_pixel, ((0, max(0, shape[0] - per_pixel.shape[0])), (0, max(0, shape[1] - per_pixel.shape[1]))),
                mode="edge")[: shape[0], : shape[1]]
    return NoiseModel(se, "per-image-blocks", n, None,
                      {"exact": False, "from": f"per-image maps block-summed by {f}",
                       "assumes": "independent pixels inside a block (correlated noise: SE over-estimated)"})


def estimate_map_noise(image, *, bins: int = MAP_NOISE_BINS) -> NoiseModel:
    """Map-only estimate of the per-pixel standard error of a bare map (module docstring).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> noisy = 5.0 + 0.1 * rng.standard_normal((128, 128))
    >>> round(float(np.median(estimate_map_noise(noisy).standard_error)), 2)
    0.1
    """
    data = check_map(image)
    padded = np.pad(data, 1, mode="reflect")
    neighbours = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4.0
    d = (data - neighbours)[1:-1, 1:-1]
    level = gaussian_filter(data, 1.5, mode="nearest")[1:-1, 1:-1]
    if d.size < 16:
        return NoiseModel(np.zeros(data.shape), "map-only", None, None,
                          {"relative_error": float("inf"), "note": "map too small to estimate its noise"})
    n_bins = int(max(1, min(bins, d.size // 64)))
    edges = np.quantile(level, np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges, level.ravel(), side="right") - 1, 0, n_bins - 1)
    centres, scales, counts = [], [], []
    flat_d = d.ravel()
    flat_level = level.ravel()
    for k in range(n_bins):
        member = which == k
        if member.sum() < 8:
            continue
        values = flat_d[member]
        mad = float(np.median(np.abs(values - np.median(values))))
        centres.append(float(np.median(flat_level[member])))
        scales.append(1.4826 * mad / np.sqrt(1.25))
        counts.append(int(member.sum()))
    order = np.argsort(centres)
    centres, scales = np.asarray(centres)[order], np.asarray(scales)[order]
    full_level = gaussian_filter(data, 1.5, mode="nearest")
    se = np.interp(full_level, centres, scales) if centres.size > 1 else np.full(data.shape, scales[0])
    lag = _lag1_correlation(d)
    reliability = {"relative_error": float(1.17 / np.sqrt(2 * min(counts))), "pixels_per_bin": int(min(counts)),
                   "bins": int(centres.size), "residual_lag1_correlation": lag,
                   "white_noise_lag1_correlation": _WHITE_LAG1, "correlated": bool(lag > -0.25),
                   "assumes": "pixel-independent noise; spatially correlated noise is under-estimated"}
    return NoiseModel(np.maximum(se, 0.0), "map-only", None, None, reliability)


def _lag1_correlation(d: np.ndarray) -> float:
    if min(d.shape) < 2:
        return float("nan")
    centred = d - d.mean()
    var = float((centred * centred).mean())
    if not var > 0:
        return float("nan")
    horizontal = float((centred[:, 1:] * centred[:, :-1]).mean())
    vertical = float((centred[1:, :] * centred[:-1, :]).mean())
    return 0.5 * (horizontal + vertical) / var
