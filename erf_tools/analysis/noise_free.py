"""Noise-free AGD score and R²: estimates of the scores of the true mean map E[M], not of the noisy average M.

An ERF map M is the mean of N per-image maps, so each pixel carries sampling noise with standard error s (known from
the per-image statistics, or estimated from the map, :mod:`.noise`). The AGD score of M is biased low by that noise,
mostly because

* the positive part of the background noise adds mass ≈ Σ s/√(2π) to the normaliser of p = max(M − b, 0) (an
  O(N^−1/2) bias that does not vanish with the map size), and
* E√p ≠ √E p inside the ERF (an O(1/N) bias).

**Estimator (plug-in bias correction with exact per-pixel expectations).** The fitted Gaussian (A, μ, Σ, offset b) is
a smooth function of M, so its own noise bias is second order; the score's bias comes from the clipping and the
square root, which act pixel by pixel. Write the Bhattacharyya coefficient as BC = U / √D with

    D = Σ_j max(x_j, 0),   U = Σ_j √q_j · √max(x_j, 0),   x_j = M_j − b,   q = g / Σ g.

For a pixel with noise-free value m and Gaussian noise of s.d. s the expectations are exact and cheap,

    E max(m + sZ, 0) = m·Φ(m/s) + s·φ(m/s),   E √max(m + sZ, 0) = √s · F(m/s),  F(k) = E √max(k + Z, 0)

(F tabulated once by quadrature), so the bias of D and U at a noise-free map m̃ is computed without Monte Carlo:
β_D(m̃) = Σ E max(m̃_j − b + s_j Z, 0) − max(m̃_j − b, 0), and likewise β_U. It is evaluated at a denoised plug-in
m̃ = fitted model + radial profile of the residual (:func:`radial_residual`: ring means along the fitted ellipses,
kept where they stand :data:`RING_THRESHOLD` standard errors above 0) + the rest of the residual smoothed by
:data:`RESIDUAL_SMOOTHING` px and kept only where it stands clearly above the noise (Wiener factor with
:data:`RESIDUAL_THRESHOLD`). What a Gaussian fit misses in an ERF is mostly radial (a disk's rim, steps, a plateau,
tails), and the bias terms are most sensitive where the map crosses the offset, exactly at such rims: rings average
the noise away without blurring across them. Noise left in the plug-in is not harmless either: the bias terms have a
cusp at x = 0, so a noisy plug-in there under-estimates them. Then
D₀ = D(M) − β_D(m̃), U₀ = U(M) − β_U(m̃), BC₀ = U₀/√D₀, H² = 1 − BC₀ and agd_score = 1 − sign(H²)·√|H²| (the signed
root: :func:`score_from_hellinger_squared`).

The expectations are taken under the noise shape of the pixels (:mod:`.noise_shape`: simulated from the per-image
maps' pooled residuals when they are given, else normal) with the variance map smoothed by
:data:`~.noise_shape.VARIANCE_SMOOTHING` px. The estimate is consistent (β → 0 as s → 0) and removes the O(N^−1/2)
term exactly when m̃ is right to within s and the shape is right.
What it cannot remove is a property of the score itself: near a perfect Gaussian the score 1 − √H² has an infinite
slope, so noise in H² of s.d. τ leaves a bias of order √τ; the intervals (built on the H² scale) say how large.
SIMEX (extrapolating D and U from added-noise levels back to zero) was tried first and over-corrects, because the
background terms of U grow like √(noise s.d.), not like a polynomial; see docs/scoring.md.

R² is corrected in closed form: E SS_res(M) = SS_res(E M) + Σ s² (1 − k/P) and E SS_tot(M) = SS_tot(E M) +
Σ s² (1 − 1/P) for a least-squares fit with k parameters on P pixels, to first order, for independent pixels; with
per-image maps the two noise terms are computed for the linearised fit (:func:`fit_noise_power`), which keeps
spatially correlated noise absorbed by the fit from being subtracted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from .noise_shape import (VARIANCE_SMOOTHING, NoiseShape, expected_positive_part, expected_sqrt_positive,
                          smoothed_standard_error)

__all__ = ["RESIDUAL_SMOOTHING", "NoiseFreeScore", "noise_free_agd", "noise_free_r_squared", "denoised_map",
           "expected_sqrt_positive", "expected_positive_part", "score_from_hellinger_squared",
           "RESIDUAL_THRESHOLD", "RING_THRESHOLD", "fit_noise_power", "radial_residual", "RADIAL_BIN_WIDTH",
           "multiscale_profile", "WORLD_RING_THRESHOLD", "world_map"]

RESIDUAL_SMOOTHING = 2.0
"""σ (map pixels) of the Gaussian smoothing the non-radial rest of the fit residual in the plug-in map."""

RESIDUAL_THRESHOLD = 4.0
"""Shrinkage threshold of the non-radial rest of the residual in the plug-in map (:func:`denoised_map`): kept only
where its local power exceeds 4 × the noise's (chosen on bench/bench_agd_noise.py: with the Wiener threshold 1 the
rest of a Gaussian map is mostly noise, which biases the correction low by up to 0.1 at 8 images)."""

RING_THRESHOLD = 2.0
"""A ring's mean residual enters the plug-in map only when it exceeds this many of its standard errors
(:func:`radial_residual`)."""

WORLD_RING_THRESHOLD = 3.0
"""Rings of the bootstrap world's noise-free map (:func:`world_map`) are kept from this many standard errors."""

RADIAL_BIN_WIDTH = 0.5
"""Width (px, in the fitted Gaussian's whitened radius scaled to √(σ_major·σ_minor)) of the bins of the residual's
radial profile in the plug-in map (:func:`radial_residual`)."""

@dataclass(frozen=True)
class NoiseFreeScore:
    """Result of :func:`noise_free_agd`.

    ``score`` is the noise-free estimate, ``raw`` the score of the noisy map (``agd_score_raw``);
    ``hellinger_squared`` the bias-corrected H² = 1 − BC₀ (negative through noise when the ERF is Gaussian within it:
    the score is then above 1, :func:`score_from_hellinger_squared`); ``bias`` = raw − score; ``noise_mass_fraction``
    the share of the raw normaliser D(M) that is noise, β_D/D(M).
    """

    score: float
    raw: float
    hellinger_squared: float
    hellinger_squared_raw: float
    bias: float
    noise_mass_fraction: float
    plug_in: str = ""
    noise_shape: str = "normal"

    def to_dict(self) -> dict:
        return {"score": self.score, "raw": self.raw, "hellinger_squared": self.hellinger_squared,
                "hellinger_squared_raw": self.hellinger_squared_raw, "bias": self.bias,
                "noise_mass_fraction": self.noise_mass_fraction, "plug_in": self.plug_in,
                "noise_shape": self.noise_shape,
                "method": "plug-in bias correction of D and U (per-pixel expectations at the denoised map under the "
                          "noise shape)",
                "residual_smoothing_px": RESIDUAL_SMOOTHING, "rest_threshold": RESIDUAL_THRESHOLD,
                "ring_threshold": RING_THRESHOLD, "ring_width_px": RADIAL_BIN_WIDTH, "score_map": "signed root"}


def score_from_hellinger_squared(h2: float, *, signed: bool = False) -> float:
    """1 − √H², with H² clipped to [0, 1] (NaN stays NaN).

    ``signed=True``: 1 − sign(H²)·√|H²| (|H²| clipped to 1), the map of the noise-free estimate. A bias-corrected H²
    scatters about its true value, below 0 too when the ERF is Gaussian within the noise; clipping it at 0 turns that
    scatter into a downward bias of the score of ≈ 0.6 × the interval half-width at a perfect Gaussian. The signed root
    is odd, so an H² estimate symmetric about 0 gives a score centred on 1 (values above 1 are that scatter), and its
    largest bias, near H² ≈ 0.4 × its own s.d., is ≈ 0.22 half-widths (docs/scoring.md, section 2).
    """
    if not np.isfinite(h2):
        return float("nan")
    if signed:
        return float(1.0 - np.sign(h2) * np.sqrt(min(abs(h2), 1.0)))
    return float(1.0 - np.sqrt(min(max(h2, 0.0), 1.0)))


def radial_residual(residual, standard_error, centre, covariance, *, width: float = RADIAL_BIN_WIDTH,
                    threshold: float | None = None, multiscale: bool = False) -> np.ndarray:
    """The residual's profile along the ellipses of the fitted Gaussian, as a map: the mean of ``residual`` in bins of
    ``width`` px of the whitened radius √(dᵀΣ⁻¹d)·(det Σ)^¼, d the offset from ``centre``.

    Why: what a Gaussian fit leaves out of an ERF is mostly radial (a disk's flat top and sharp rim, the steps of a
    stepped profile, a plateau under a spike, heavier or lighter tails), and the bias terms are most sensitive
    exactly at such rims, where the map crosses the fitted offset. A ring of pixels averages the noise away (a ring
    of radius r has ≈ 2πr·``width`` pixels) without blurring across the rim, which isotropic smoothing does.
    The mean is unweighted: weights from the pixels' own standard errors are correlated with their values (a ReLU'd
    pixel that was 0 in most images has both a low value and a low standard error) and bias the profile. A ring's
    mean p is kept only where p² ≥ ``threshold``·e² (default :data:`RING_THRESHOLD`²), e its standard error
    (independent pixels), and set to 0 otherwise (hard thresholding: a partly shrunk significant ring would leave a
    systematic error at a rim): a ring whose mean is noise contributes nothing, because the bias terms have a cusp
    where the map crosses the offset and even an unbiased but noisy plug-in there under-estimates them.

    ``multiscale=True`` replaces the single ring width by the top-down dyadic profile of :func:`multiscale_profile`
    (also keeps small level shifts over wide rings). Not the default: on bench/bench_agd_noise.py it removes the
    over-correction of the stepped profile and of ReLU'd Gaussians but biases Gaussians under white noise lower
    (more tests, more noise rings kept at the cusp); bench/RESULTS.md, "fourth round".
    """
    threshold = RING_THRESHOLD**2 if threshold is None else threshold
    r = np.asarray(residual, dtype=np.float64)
    s2 = np.broadcast_to(np.asarray(standard_error, dtype=np.float64) ** 2, r.shape)
    cov = np.asarray(covariance, dtype=np.float64)
    det = float(np.linalg.det(cov)) if cov.shape == (2, 2) else float("nan")
    if not (det > 0 and np.all(np.isfinite(cov)) and all(np.isfinite(centre))) or not width > 0:
        return np.zeros_like(r)
    yy, xx = np.mgrid[: r.shape[0], : r.shape[1]].astype(np.float64)
    dy, dx = yy - float(centre[0]), xx - float(centre[1])
    inv = np.linalg.inv(cov)
    radius = np.sqrt(np.maximum(inv[0, 0] * dy * dy + 2 * inv[0, 1] * dy * dx + inv[1, 1] * dx * dx, 0.0)) * det**0.25
    bins = (radius / width).astype(np.intp).ravel()
    if multiscale:
        profile = multiscale_profile(bins, r.ravel(), s2.ravel(), threshold)
    else:
        _, profile, noise = _ring_statistics(bins, r.ravel(), s2.ravel(), int(bins.max()) + 1)
        profile[profile * profile < threshold * noise] = 0.0
    return profile[bins].reshape(r.shape)


def _ring_statistics(bins, values, variances, size: int):
    """(pixel count, mean value, variance of the mean) of each of ``size`` rings, independent pixels."""
    count = np.bincount(bins, minlength=size).astype(np.float64)
    mean = np.divide(np.bincount(bins, values, minlength=size), count, out=np.zeros(size), where=count > 0)
    noise = np.divide(np.bincount(bins, variances, minlength=size), count**2, out=np.zeros(size), where=count > 0)
    return count, mean, noise


def multiscale_profile(bins, values, variances, threshold: float) -> np.ndarray:
    """Top-down dyadic profile: ring means at widths 2^L × the finest, from the coarsest down, each kept where it
    differs from its parent's value by more than √threshold standard errors, else the parent's value (0 above the
    coarsest ring).

    Why: a rim or a step needs the finest rings, while a small level shift spread over a wide background (the fitted
    offset sitting a fraction of the noise above the true background, a ReLU'd tail) is significant only in wide
    rings, and the bias terms are most sensitive exactly there, where the map crosses the offset.

    ``bins`` is each pixel's index among the finest rings, ``values`` and ``variances`` its residual and squared
    standard error (flattened alike); returns the value of each finest ring. A ring's standard error assumes
    independent pixels, as in :func:`radial_residual`.
    """
    n_fine = int(bins.max()) + 1
    levels = int(np.ceil(np.log2(n_fine)))
    value = np.zeros(1)  # above the coarsest ring (a single one): 0
    for level in range(levels, -1, -1):
        size = (n_fine - 1 >> level) + 1
        count, mean, noise = _ring_statistics(bins >> level, values, variances, size)
        parent = value[np.arange(size) >> 1]
        value = np.where((mean - parent) ** 2 >= threshold * noise, mean, parent)
        value[count == 0] = parent[count == 0]
    return value


def denoised_map(image, model, standard_error, *, smoothing: float = RESIDUAL_SMOOTHING,
                 threshold: float = RESIDUAL_THRESHOLD, centre=None, covariance=None) -> np.ndarray:
    """Plug-in estimate of the noise-free map: ``model`` + the residual's radial profile (:func:`radial_residual`,
    when the fit's ``centre`` and ``covariance`` are given) + the Wiener-shrunk Gaussian-smoothed rest of the residual
    (module docstring).

    Parameters
    ----------
    image, model : array_like, shape (H, W)
        The noisy map and the fitted model (with its offset).
    standard_error : array_like, shape (H, W) or float
        Per-pixel standard error of ``image``.
    smoothing : float
        σ in pixels of the Gaussian that smooths the residual (0: the residual is used unsmoothed, unshrunk).
    threshold : float
        Shrink factor max(0, 1 − threshold · noise variance / local residual power): 1 is the Wiener factor; larger
        values keep the residual only where it clearly stands above the noise.
    centre, covariance : optional
        The fitted Gaussian's centre (y, x) and covariance (map pixels): the residual's radial profile is then part of
        the plug-in, unsmoothed across rings.
    """
    data = np.asarray(image, dtype=np.float64)
    if not smoothing > 0:
        return data.copy()
    model = np.asarray(model, dtype=np.float64)
    if centre is not None and covariance is not None:
        model = model + radial_residual(data - model, standard_error, centre, covariance)
    residual = data - model
    s2 = np.broadcast_to(np.asarray(standard_error, dtype=np.float64) ** 2, data.shape)
    smooth = gaussian_filter(residual, smoothing, mode="nearest")
    # variance of white noise after the filter: s² · Σ k² (k the sampled kernel)
    size = int(4 * smoothing + 0.5)
    delta = np.zeros((2 * size + 1, 2 * size + 1))
    delta[size, size] = 1.0
    kernel_power = float((gaussian_filter(delta, smoothing, mode="constant") ** 2).sum())
    noise_var = gaussian_filter(s2, smoothing, mode="nearest") * kernel_power
    power = gaussian_filter(smooth * smooth, 2 * smoothing, mode="nearest")
    shrink = np.clip(1.0 - np.divide(threshold * noise_var, power, out=np.ones_like(power), where=power > 0), 0.0, 1.0)
    return model + shrink * smooth


def world_map(image, model, standard_error, centre, covariance) -> np.ndarray:
    """The noise-free map of the residual bootstrap's world (:func:`~erf_tools.analysis.analyze`): ``model`` plus the
    residual's ring profile (:func:`radial_residual`), rings kept from :data:`WORLD_RING_THRESHOLD` standard errors.

    Why not the plug-in map of :func:`denoised_map`: the bias terms need a plug-in that errs towards keeping
    structure (a missed rim costs more than a noise ring), whereas the world's map is the truth the resamples are
    scored against, and every noise ring or blob kept there makes that truth rougher than the real one (a Gaussian
    under white noise at 256 images: world H² 0.001–0.003 against a true 10⁻⁶). The stricter rings and no non-radial
    rest keep it as smooth as the data allow (bench/RESULTS.md, "fifth round").
    """
    model = np.asarray(model, dtype=np.float64)
    return model + radial_residual(np.asarray(image, dtype=np.float64) - model, standard_error, centre, covariance,
                                   threshold=WORLD_RING_THRESHOLD**2)


def noise_free_agd(image, offset: float, gaussian, standard_error, *, model=None,
                   smoothing: float = RESIDUAL_SMOOTHING, threshold: float = RESIDUAL_THRESHOLD,
                   plug_in: str = "radial", noise_shape: NoiseShape | None = None,
                   variance_smoothing: float = VARIANCE_SMOOTHING, level_scale: float = 1.0, centre=None,
                   covariance=None) -> NoiseFreeScore:
    """Noise-free AGD score of a noisy map for a given fit (module docstring).

    Parameters
    ----------
    image : array_like, shape (H, W)
        The (noisy) mean map.
    offset : float
        Fitted offset b.
    gaussian : array_like, shape (H, W)
        The fitted Gaussian without offset on the same grid, at the map's scale.
    standard_error : array_like, shape (H, W) or float
        Standard error of each pixel of ``image`` (same units).
    model : array_like, optional
        The fitted model with offset (default ``gaussian + offset``).
    smoothing, threshold : float
        Residual smoothing and shrinkage of the plug-in map (:func:`denoised_map`).
    plug_in : {"radial", "model"}
        The noise-free map at which the bias is evaluated: the model plus the residual's significant radial profile
        and strong non-radial structure (:func:`denoised_map`, the default), or the fitted model alone (exact only for
        a map that is a Gaussian plus a constant, and biased high on ReLU'd Gaussians, whose tails are not).
    noise_shape : NoiseShape, optional
        Distribution of the standardised pixel noise of the mean (:func:`~.noise_shape.noise_shape_from_stack`, from
        the per-image maps); default normal (the central limit theorem).
    variance_smoothing : float
        σ (px of ``image``) of the Gaussian smoothing of the variance map behind the bias terms
        (:func:`~.noise_shape.smoothed_standard_error`; 0: each pixel's own standard error).
    centre, covariance : optional
        The fitted Gaussian's centre and covariance (map pixels), for the radial part of the plug-in map
        (:func:`denoised_map`); without them the residual is only smoothed and shrunk.
    level_scale : float
        Factor from this map's per-image signal-to-noise ratio to that of the maps the shape was built from: a shape
        from per-image maps block-summed by f, applied to a map with f times finer pixels, needs f (a block of f²
        independent pixels has f times the ratio of one).

    Returns
    -------
    NoiseFreeScore
        NaN fields when the map has nothing above the offset or the Gaussian is empty.

    Examples
    --------
    >>> from erf_tools.analysis import gaussian_2d
    >>> g = gaussian_2d((48, 48), (23.5, 23.5), 5.0, 5.0)
    >>> round(noise_free_agd(g, 0.0, g, 0.0).score, 6)
    1.0
    """
    data = np.asarray(image, dtype=np.float64)
    g = np.asarray(gaussian, dtype=np.float64)
    s = np.broadcast_to(np.asarray(standard_error, dtype=np.float64), data.shape)
    if g.shape != data.shape:
        raise ValueError(f"gaussian must have the map's shape {data.shape}, got {g.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("standard_error must be finite and non-negative")
    nan = float("nan")
    g_sum = g.sum()
    x = data - float(offset)
    positive = np.maximum(x, 0.0)
    if not (g_sum > 0 and np.isfinite(g_sum)) or not positive.sum() > 0:
        return NoiseFreeScore(nan, nan, nan, nan, nan, nan, "")
    root_q = np.sqrt(np.maximum(g / g_sum, 0.0))
    d_raw = float(positive.sum())
    u_raw = float((root_q * np.sqrt(positive)).sum())
    h2_raw = 1.0 - min(u_raw / np.sqrt(d_raw), 1.0)
    model = g + float(offset) if model is None else np.asarray(model, dtype=np.float64)
    if plug_in not in ("radial", "model"):
        raise ValueError(f"plug_in must be 'radial' or 'model', got {plug_in!r}")
    use_model = plug_in == "model"
    plug = (model if use_model else denoised_map(data, model, s, smoothing=smoothing, threshold=threshold,
                                                 centre=centre, covariance=covariance)) - float(offset)
    plug_pos = np.maximum(plug, 0.0)
    scale = smoothed_standard_error(s, variance_smoothing)
    if noise_shape is None or noise_shape.is_normal:
        expected_d, expected_u = expected_positive_part(plug, scale), expected_sqrt_positive(plug, scale)
    else:
        level = level_scale * noise_shape.level_of(data, scale, variance_smoothing)
        expected_d = noise_shape.expected_positive_part(plug, scale, level)
        expected_u = noise_shape.expected_sqrt_positive(plug, scale, level)
    bias_d = float((expected_d - plug_pos).sum())
    bias_u = float((root_q * (expected_u - np.sqrt(plug_pos))).sum())
    d0, u0 = d_raw - bias_d, u_raw - bias_u
    h2 = 1.0 - u0 / np.sqrt(d0) if d0 > 0 and u0 > 0 else nan
    raw = score_from_hellinger_squared(h2_raw)
    score = score_from_hellinger_squared(h2, signed=True)
    return NoiseFreeScore(score=score, raw=raw, hellinger_squared=float(h2), hellinger_squared_raw=float(h2_raw),
                          bias=raw - score if np.isfinite(score) else nan, noise_mass_fraction=bias_d / d_raw,
                          plug_in="model" if use_model else "model+radial+residual",
                          noise_shape="normal" if noise_shape is None else noise_shape.source)


def fit_noise_power(stack, jacobian) -> tuple[float, float]:
    """(E‖(I − H)e‖², E‖e − ē‖²) for the noise e of the mean of a (N, H, W) stack, H the hat matrix of a fit.

    ``jacobian`` (P × k) is the fit's Jacobian at its solution, so H = J(JᵀJ)⁻¹Jᵀ is the linearised fit. Spatially
    correlated noise (a per-image gain, smooth per-image structure) is partly absorbed by the k parameters; the
    independent-pixel value Σ s²(1 − k/P) then over-states the noise left in the residual and clips R² at 1. From the
    per-image deviations d_i = X_i − M: Σ_i (‖d_i‖² − d_iᵀ H d_i) / (N(N − 1)), and likewise about the mean.
    """
    data = np.asarray(stack, dtype=np.float64)
    n = data.shape[0]
    jac = np.asarray(jacobian, dtype=np.float64)
    if n < 2 or jac.shape[0] != data[0].size:
        raise ValueError("fit_noise_power needs ≥ 2 per-image maps at the map's resolution")
    gram = jac.T @ jac
    mean = data.mean(axis=0).ravel()
    residual = total = 0.0
    for start in range(0, n, 64):
        d = data[start:start + 64].reshape(-1, mean.size) - mean
        proj = d @ jac
        explained = np.einsum("ik,ik->i", proj, np.linalg.lstsq(gram, proj.T, rcond=None)[0].T)
        squares = np.einsum("ip,ip->i", d, d)
        residual += float((squares - explained).sum())
        total += float((squares - d.sum(axis=1) ** 2 / mean.size).sum())
    scale = 1.0 / (n * (n - 1))
    return residual * scale, total * scale


def noise_free_r_squared(image, model, standard_error, *, n_parameters: int = 7,
                         noise_power: tuple[float, float] | None = None) -> tuple[float, float]:
    """(noise-corrected R², raw R²) of a least-squares fit ``model`` to a noisy ``image`` (module docstring).

    The correction removes the expected noise contributions Σ s²(1 − k/P) from SS_res and Σ s²(1 − 1/P) from SS_tot
    (independent pixels), or the given ``noise_power`` (:func:`fit_noise_power`, from per-image maps), so it estimates
    1 − SS_res(E M)/SS_tot(E M) of the noise-free map; it is clipped to at most 1.
    """
    data = np.asarray(image, dtype=np.float64)
    model = np.asarray(model, dtype=np.float64)
    s2 = np.broadcast_to(np.asarray(standard_error, dtype=np.float64) ** 2, data.shape)
    p = data.size
    ss_tot = float(((data - data.mean()) ** 2).sum())
    ss_res = float(((data - model) ** 2).sum())
    if not ss_tot > 0:
        return float("nan"), float("nan")
    noise = float(s2.sum())
    raw = 1.0 - ss_res / ss_tot
    res_noise, tot_noise = noise_power if noise_power is not None else (noise * (1.0 - n_parameters / p),
                                                                         noise * (1.0 - 1.0 / p))
    tot0 = ss_tot - tot_noise
    res0 = max(ss_res - res_noise, 0.0)
    corrected = 1.0 - res0 / tot0 if tot0 > 0 else float("nan")
    return float(min(corrected, 1.0)), float(raw)
