"""Weighted Gaussian fit: the map's per-pixel standard errors as weights, and the χ² of the fit against them.

Same model as :func:`~erf_tools.analysis.gaussian_fit.fit_gaussian` (full-covariance Gaussian plus a floor), fitted
with weights 1/s² from a first unweighted fit, so that a goodness of fit can be judged against the noise: "a
Gaussian explains this map within its noise" is the χ² p-value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import chi2 as chi2_distribution

from .gaussian_fit import (GaussianFit, cov_from_params, failure_flags, gaussian_model, params_from_cov,
                           params_from_ellipse, r_squared)
from .maps import block_reduce, check_map
from .moments import ellipse_from_covariance

__all__ = ["WeightedGaussianFit", "fit_gaussian_weighted"]


@dataclass(frozen=True)
class WeightedGaussianFit:
    """Result of :func:`fit_gaussian_weighted`: the weighted fit and its goodness of fit against the pixel noise.

    ``chi2`` = Σ ((M − m)/s)² over the map, ``dof`` = pixels − 7, ``p_value`` = P(χ²_dof ≥ chi2): small means the
    Gaussian does not explain the map within its noise. ``standard_error_floor`` is the smallest s used (pixels with
    zero sample variance get it).
    """

    fit: GaussianFit
    chi2: float
    dof: int
    p_value: float
    standard_error_floor: float

    @property
    def chi2_per_dof(self) -> float:
        return self.chi2 / self.dof if self.dof > 0 else float("nan")

    def to_dict(self) -> dict:
        out = self.fit.to_dict()
        out.update({"chi2": self.chi2, "dof": self.dof, "chi2_per_dof": self.chi2_per_dof, "p_value": self.p_value,
                    "standard_error_floor": self.standard_error_floor,
                    "gaussian_within_noise": bool(self.p_value >= 0.05) if np.isfinite(self.p_value) else None})
        return out


def fit_gaussian_weighted(image, standard_error, init: GaussianFit, *, max_side: int = 256,
                          max_nfev: int = 100, r_squared_threshold: float = 0.5,
                          variance_dof: int | None = None) -> WeightedGaussianFit:
    """Weighted least-squares fit of ``A·exp(−½ (x−μ)ᵀ Σ⁻¹ (x−μ)) + b`` with weights 1/s², started from ``init``.

    Parameters
    ----------
    image : array_like, shape (H, W)
        The map.
    standard_error : array_like, shape (H, W)
        Standard error of each pixel. Values below a floor (0.1 × the median positive s) are raised to it, so that
        pixels where every image was 0 do not get infinite weight.
    init : GaussianFit
        Start (normally the unweighted fit of the same map).
    max_side : int
        Fitted on block means no larger than this per side (block s = √Σs²/f², pixels independent); χ² is always
        computed on the full map.
    variance_dof : int, optional
        Degrees of freedom ν of the variances behind ``standard_error`` (N − 1 for N images). A residual divided by an
        estimated s has E[(r/ŝ)²] = ν/(ν − 2), so χ² is multiplied by (ν − 2)/ν (ν > 2) before the p-value.

    Returns
    -------
    WeightedGaussianFit
        NaN χ² when ``init`` has no finite parameters.
    """
    data = check_map(image)
    s = np.asarray(standard_error, dtype=np.float64)
    if s.shape != data.shape or not np.all(np.isfinite(s)) or s.min() < 0:
        raise ValueError("standard_error must be a finite, non-negative array of the map's shape")
    positive = s[s > 0]
    floor = 0.1 * float(np.median(positive)) if positive.size else 0.0
    nan = float("nan")
    dof = int(data.size - 7)
    if not floor > 0 or not (np.isfinite(init.sigma_major) and init.sigma_minor > 0 and np.isfinite(init.amplitude)):
        return WeightedGaussianFit(init, nan, dof, nan, floor)
    s_eff = np.maximum(s, floor)
    scale = float(np.max(np.abs(data)))
    work, s_work = data / scale, s_eff / scale
    f = max(1, int(np.ceil(max(data.shape) / max_side)))
    reduced = block_reduce(work, f) if f > 1 else work
    s_reduced = np.sqrt(block_reduce(s_work**2, f, how="sum")) / f**2 if f > 1 else s_work
    ys = np.arange(reduced.shape[0], dtype=np.float64)
    xs = np.arange(reduced.shape[1], dtype=np.float64)
    added = (f * f - 1) / 12.0
    p0 = params_from_ellipse(init.amplitude / scale, init.offset / scale,
                              tuple((c - (f - 1) / 2) / f for c in init.centre), 1.0, 1.0, 0.0)
    cov0 = (init.covariance + added * np.eye(2)) / f**2
    amp0 = init.amplitude / scale * np.sqrt(np.linalg.det(init.covariance) / np.linalg.det(init.covariance
                                                                                          + added * np.eye(2)))
    p0 = params_from_cov(amp0, init.offset / scale, p0[2:4], cov0)
    weights = (1.0 / s_reduced).ravel()

    def fun(q):
        return (gaussian_model(q, ys, xs) - reduced).ravel() * weights

    def jac(q):
        return gaussian_model(q, ys, xs, jacobian=True)[1] * weights[:, None]

    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        try:
            res = least_squares(fun, p0, jac=jac, method="lm", x_scale="jac", max_nfev=max_nfev,
                                ftol=1e-10, xtol=1e-10, gtol=1e-10)
            p, converged, nfev = res.x, bool(res.status > 0), int(res.nfev)
        except (ValueError, np.linalg.LinAlgError):
            p, converged, nfev = p0, False, 0
    if not np.all(np.isfinite(p)):
        return WeightedGaussianFit(init, nan, dof, nan, floor)
    # back to full-resolution pixels
    cov = cov_from_params(p) * f**2
    values, vectors = np.linalg.eigh(cov - added * np.eye(2))
    sharp = (vectors * np.maximum(values, 0.05)) @ vectors.T
    amp = p[0] * np.sqrt(np.linalg.det(cov) / np.linalg.det(sharp))
    centre = (float(p[2]) * f + (f - 1) / 2, float(p[3]) * f + (f - 1) / 2)
    full = params_from_cov(amp, p[1], centre, sharp)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        model = gaussian_model(full, np.arange(data.shape[0], dtype=np.float64), np.arange(data.shape[1], dtype=np.float64))
    chi2 = float((((work - model) / s_work) ** 2).sum())
    if variance_dof is not None and variance_dof > 2:
        chi2 *= (variance_dof - 2) / variance_dof
    major, minor, theta = ellipse_from_covariance(sharp)
    r2 = r_squared(work, model)
    flags = [] if converged else ["not_converged"]
    flags += failure_flags(full[0], centre, major, minor, r2, data.shape, r_squared_threshold)
    fit = GaussianFit(amplitude=float(full[0]) * scale, offset=float(full[1]) * scale, centre=centre,
                      sigma_major=major, sigma_minor=minor, theta=theta, r_squared=r2,
                      rmse=float(np.sqrt(np.mean((work - model) ** 2))) * scale, converged=converged,
                      flags=tuple(dict.fromkeys(flags)), nfev=nfev, block=f, window=None, shape=tuple(data.shape))
    p_value = float(chi2_distribution.sf(chi2, dof)) if dof > 0 else nan
    return WeightedGaussianFit(fit, chi2, dof, p_value, floor * 1.0)


# --- Kim et al. / OpenERF fit ---------------------------------------------------------------------------------------
