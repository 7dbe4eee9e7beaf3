"""How Gaussian is the shape of an ERF: AGD score, Hellinger distance, Mardia kurtosis, generalised-Gaussian exponent,
radial-profile monotonicity (agd-metrics.md §1.3–1.6).

**AGD score** (the headline, in [0, 1]): ``1 − H(p, g)`` where

* p = max(M − b, 0) / Σ max(M − b, 0) is the ERF with the offset b of the full-covariance Gaussian fit removed and
  clipped at zero, normalised to sum 1 (the fit constrains b ≥ 0: an ERF's floor cannot be negative);
* g = A·exp(−½ (x−μ)ᵀ Σ⁻¹ (x−μ)) sampled on the same pixel grid (fitted A, μ, Σ, no offset), normalised to sum 1;
* H = √(1 − BC) is the Hellinger distance, BC = Σ √(p·g) the Bhattacharyya coefficient.

H is 0 for identical distributions and 1 for disjoint ones, is a metric, and is insensitive to the overall scale of
the map. The fitted offset is removed first so that a uniform floor (global attention, padding artefacts) does not
count against the shape; the floor is reported separately.

Reference values (tests/test_analysis_shape.py): a sampled Gaussian, any σ, orientation or floor, scores ≥ 0.99; a
Laplacian cusp exp(−r/8) 0.81; a uniform disk or square 0.58–0.59 at any radius and canvas size (no Gaussian can do
much better: the Hellinger-closest Gaussian to a continuous disk, σ ≈ 0.45 R, has BC = 0.903, i.e. a score of 0.689);
a spike on a plateau 0.62; concentric rings 0.54; OpenERF's published maps: ResNet-50 a1 0.93, Swin-T 0.55,
ViT-S augreg 0.19.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, least_squares
from scipy.signal import find_peaks
from scipy.special import gammaln

from .gaussian_fit import GaussianFit
from .maps import check_distribution, check_map
from .moments import image_moments

__all__ = [
    "bhattacharyya_coefficient",
    "hellinger_distance",
    "agd_score",
    "moment_matched_gaussian",
    "hellinger_to_moment_gaussian",
    "mardia_kurtosis",
    "generalised_gaussian_kurtosis",
    "beta_from_kurtosis",
    "ShapeExponentFit",
    "fit_shape_exponent",
    "RadialProfile",
    "radial_profile",
    "radial_monotonicity",
    "whitened_distance",
]

GAUSSIAN_MARDIA_KURTOSIS = 8.0
"""Mardia's β₂ of a 2-D Gaussian (d = 2: d(d+2))."""


def _as_probability(image, name: str) -> np.ndarray:
    array = check_distribution(image, name=name, min_side=1)
    total = array.sum()
    if not total > 0:
        raise ValueError(f"{name} sums to zero: it is not a distribution")
    return array / total


def bhattacharyya_coefficient(p, q) -> float:
    """BC = Σ √(p·q) of two non-negative maps of the same shape, each normalised to sum 1 first (in [0, 1])."""
    p = _as_probability(p, "p")
    q = _as_probability(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    return float(min(np.sqrt(p * q).sum(), 1.0))


def hellinger_distance(p, q) -> float:
    """Hellinger distance √(1 − BC) = √(½ Σ (√p − √q)²) between two non-negative maps (normalised first).

    Examples
    --------
    >>> hellinger_distance([[1, 0], [0, 0]], [[0, 0], [0, 1]])
    1.0
    >>> hellinger_distance([[1, 2], [3, 4]], [[2, 4], [6, 8]])
    0.0
    """
    p = _as_probability(p, "p")
    q = _as_probability(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    # ½ Σ (√p − √q)² is exact near 0 where 1 − BC would lose digits
    return float(np.sqrt(min(max(0.5 * float(((np.sqrt(p) - np.sqrt(q)) ** 2).sum()), 0.0), 1.0)))


def agd_score(image, fit: GaussianFit) -> float:
    """AGD score 1 − H between the offset-removed ERF and the fitted Gaussian on the same grid (module docstring).

    Parameters
    ----------
    image : array_like, shape (H, W)
        The ERF map the Gaussian was fitted to.
    fit : GaussianFit
        A full-covariance fit of ``image`` (:func:`~erf_tools.analysis.gaussian_fit.fit_gaussian`).

    Returns
    -------
    float
        In [0, 1]; NaN when the fit has no finite parameters, a non-positive amplitude, or nothing of the map is left
        above the fitted offset.
    """
    data = check_map(image)
    params = (fit.amplitude, fit.offset, *fit.centre, fit.sigma_major, fit.sigma_minor, fit.theta)
    if not all(np.isfinite(params)) or not fit.amplitude > 0 or not fit.sigma_minor > 0:
        return float("nan")
    erf = np.maximum(data - fit.offset, 0.0)
    if not erf.sum() > 0:
        return float("nan")
    with np.errstate(under="ignore", over="ignore", invalid="ignore", divide="ignore"):
        gauss = fit.evaluate(data.shape, with_offset=False)
    if not np.all(np.isfinite(gauss)):
        return float("nan")
    if not gauss.sum() > 0:
        return 0.0
    return 1.0 - hellinger_distance(erf, gauss)


def moment_matched_gaussian(image) -> np.ndarray:
    """The discretised Gaussian 𝒩(μ, Σ) with the map's own mean and covariance, normalised to sum 1 on its grid."""
    data = check_distribution(image)
    mom = image_moments(data)
    if not mom.sigma_minor > 1e-3:
        raise ValueError("the map's covariance is singular (all mass on a line or a pixel)")
    from .gaussian_fit import gaussian_2d

    with np.errstate(under="ignore"):
        g = gaussian_2d(data.shape, mom.centre, mom.sigma_major, mom.sigma_minor, mom.theta)
    return g / g.sum()


def hellinger_to_moment_gaussian(image) -> float:
    """Hellinger distance between a non-negative map and its moment-matched discretised Gaussian (agd-metrics.md §1.4).

    This is the "Hellinger" column of the reference table in agd-metrics.md §3 (computed there on the raw,
    sum-normalised map). NaN when the covariance is singular.
    """
    data = check_distribution(image)
    try:
        g = moment_matched_gaussian(data)
    except ValueError:
        return float("nan")
    return hellinger_distance(data, g)


def whitened_distance(shape, centre, covariance) -> np.ndarray:
    """Mahalanobis distance to ``centre`` under ``covariance`` (yx-ordered), rescaled to pixels of the geometric-mean σ.

    d_Q(x) = √((x−μ)ᵀ Σ⁻¹ (x−μ)) · (σ_major σ_minor)^½, so that det Q is fixed and an isotropic Σ gives the Euclidean
    distance.
    """
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.shape != (2, 2) or not np.all(np.isfinite(cov)) or not np.all(np.isfinite(centre)):
        raise ValueError("covariance must be a finite 2x2 matrix and centre finite")
    if not np.linalg.eigvalsh(0.5 * (cov + cov.T)).min() >= 1e-6:
        raise ValueError("covariance must be positive definite with σ ≥ 1e-3 px along every axis")
    det = float(np.linalg.det(cov))
    inv = np.linalg.inv(cov)
    dy = (np.arange(shape[0]) - centre[0])[:, None]
    dx = (np.arange(shape[1]) - centre[1])[None, :]
    q = inv[0, 0] * dy * dy + 2 * inv[0, 1] * dy * dx + inv[1, 1] * dx * dx
    return np.sqrt(np.maximum(q, 0.0)) * det**0.25


def mardia_kurtosis(image, *, centre=None, covariance=None) -> float:
    """Mardia's multivariate kurtosis β₂ = Σ p·d⁴, d² = (x−μ)ᵀ Σ⁻¹ (x−μ) (agd-metrics.md §1.3).

    Parameters
    ----------
    image : array_like, shape (H, W)
        Non-negative map (normalised internally).
    centre, covariance : optional
        μ (y, x) and Σ (yx-ordered); default the map's own moments (moment-matched, as in the definition).

    Returns
    -------
    float
        8 for a 2-D Gaussian, 16/3 for a uniform disk, 5.6 for a uniform square; larger for heavy tails. Truncation by
        the canvas lowers it (σ = 60 on 224 px gives ≈ 6.6). NaN for a singular covariance.
    """
    p = _as_probability(image, "map")
    if centre is None or covariance is None:
        mom = image_moments(p)
        centre = mom.centre if centre is None else centre
        covariance = mom.covariance if covariance is None else covariance
    cov = np.asarray(covariance, dtype=np.float64)
    if not (np.all(np.isfinite(cov)) and np.linalg.det(cov) > 1e-12 * max(1.0, float(np.abs(cov).max())) ** 2):
        return float("nan")
    inv = np.linalg.inv(cov)
    dy = (np.arange(p.shape[0]) - centre[0])[:, None]
    dx = (np.arange(p.shape[1]) - centre[1])[None, :]
    d2 = inv[0, 0] * dy * dy + 2 * inv[0, 1] * dy * dx + inv[1, 1] * dx * dx
    return float((p * d2 * d2).sum())


def generalised_gaussian_kurtosis(beta: float) -> float:
    """Mardia β₂ of an elliptical 2-D generalised Gaussian exp(−(d/α)^β): 4 Γ(6/β) Γ(2/β) / Γ(4/β)².

    Examples
    --------
    >>> round(generalised_gaussian_kurtosis(2.0), 6), round(generalised_gaussian_kurtosis(1.0), 3)
    (8.0, 13.333)
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return float(4.0 * np.exp(gammaln(6.0 / beta) + gammaln(2.0 / beta) - 2.0 * gammaln(4.0 / beta)))


def beta_from_kurtosis(beta2: float, *, bounds: tuple[float, float] = (0.3, 20.0)) -> float:
    """Invert :func:`generalised_gaussian_kurtosis`: the exponent β with Mardia β₂ (clipped to ``bounds``).

    Only meaningful for elliptical maps not truncated by the canvas. Returns the upper bound for β₂ ≤ 16/3 (flat top),
    NaN for a non-finite β₂.
    """
    if not np.isfinite(beta2):
        return float("nan")
    lo, hi = bounds
    if beta2 >= generalised_gaussian_kurtosis(lo):
        return float(lo)
    if beta2 <= generalised_gaussian_kurtosis(hi):
        return float(hi)
    return float(brentq(lambda b: generalised_gaussian_kurtosis(b) - beta2, lo, hi, xtol=1e-10))


@dataclass(frozen=True)
class ShapeExponentFit:
    """Result of :func:`fit_shape_exponent`: m = A·exp(−(d_Q/α)^β) + b."""

    beta: float
    alpha: float
    amplitude: float
    offset: float
    r_squared: float
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"beta": self.beta, "alpha": self.alpha, "amplitude": self.amplitude, "offset": self.offset,
                "r_squared": self.r_squared, "flags": list(self.flags)}


def fit_shape_exponent(image, centre, covariance, *, bounds: tuple[float, float] = (0.3, 20.0),
                       bin_width: float = 0.25) -> ShapeExponentFit:
    """Fit the generalised-Gaussian radial exponent β (agd-metrics.md §1.5).

    ``m(x) = A·exp(−(d_Q(x)/α)^β) + b`` with d_Q the whitened distance (:func:`whitened_distance`) about ``centre``
    with the shape of ``covariance`` (normally the full-covariance Gaussian fit). β = 2 is Gaussian, β ≫ 2 flat-top
    (disk, box), β < 2 a cusp with heavy tails. The pixels are grouped in ``bin_width``-px shells of d_Q and the shell
    means fitted with weights = pixel counts, which is the pixel least-squares fit up to the variation inside a shell.

    Returns
    -------
    ShapeExponentFit
        Flag ``beta_at_bound`` when β ends on a bound (e.g. a hard-edged disk goes to the upper bound);
        ``too_few_shells`` when fewer than 6 shells are available.
    """
    data = check_map(image)
    nan = float("nan")
    try:
        dist = whitened_distance(data.shape, centre, covariance)
    except (ValueError, np.linalg.LinAlgError):
        return ShapeExponentFit(nan, nan, nan, nan, nan, ("singular_covariance",))
    index = np.floor(dist / bin_width).astype(np.int64).ravel()
    counts = np.bincount(index)
    used = counts > 0
    if used.sum() < 6:
        return ShapeExponentFit(nan, nan, nan, nan, nan, ("too_few_shells",))
    radius = np.bincount(index, weights=dist.ravel())[used] / counts[used]
    scale = float(np.abs(data).max())
    if not scale > 0:
        return ShapeExponentFit(nan, nan, nan, nan, nan, ("empty_map",))
    mean = np.bincount(index, weights=data.ravel() / scale)[used] / counts[used]
    weight = np.sqrt(counts[used].astype(np.float64))
    lo, hi = bounds
    cov = np.asarray(covariance, dtype=np.float64)
    sigma_geo = float(np.linalg.det(cov)) ** 0.25
    b0 = float(mean[-max(1, len(mean) // 10):].mean())
    a0 = float(mean[0]) - b0
    r_max = float(radius.max())

    def model(p):
        amp, off, log_alpha, beta = p
        with np.errstate(over="ignore", under="ignore"):
            return amp * np.exp(-((radius / np.exp(log_alpha)) ** beta)) + off

    def fun(p):
        return weight * (model(p) - mean)

    log_radius = np.log(np.where(radius > 0, radius, 1.0))

    def jac(p):
        amp, _, log_alpha, beta = p
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            z = np.exp(beta * (log_radius - log_alpha)) * (radius > 0)
            e = np.exp(-z)
            out = np.empty((radius.size, 4))
            out[:, 0] = e
            out[:, 1] = 1.0
            out[:, 2] = amp * e * beta * z
            out[:, 3] = -amp * e * z * (log_radius - log_alpha) * (radius > 0)
        return np.nan_to_num(out * weight[:, None], nan=0.0, posinf=0.0, neginf=0.0)

    lower = np.array([-np.inf, -np.inf, np.log(1e-3), lo])
    upper = np.array([np.inf, np.inf, np.log(100 * max(r_max, 1.0)), hi])

    def solve(p0, budget):
        try:
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                return least_squares(fun, np.clip(p0, lower + 1e-9, upper - 1e-9), jac=jac, bounds=(lower, upper),
                                     method="trf", x_scale="jac", max_nfev=budget)
        except (ValueError, np.linalg.LinAlgError):
            return None

    # four starts on a short budget, then the best one to convergence
    best = None
    for beta0 in (2.0, 1.0, 4.0, 8.0):
        # α such that the half-maximum radius matches a Gaussian of σ_geo: (r½/α)^β = ln 2
        alpha0 = sigma_geo * np.sqrt(2 * np.log(2)) / np.log(2) ** (1 / beta0)
        alpha0 = float(np.clip(alpha0, 1e-3, 10 * max(r_max, 1.0)))
        res = solve(np.array([a0 if a0 > 0 else 1.0, b0, np.log(alpha0), beta0]), 40)
        if res is not None and np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is not None and best.status == 0:
        more = solve(best.x, 200)
        if more is not None and np.isfinite(more.cost) and more.cost <= best.cost:
            best = more
    if best is None:
        return ShapeExponentFit(nan, nan, nan, nan, nan, ("not_converged",))
    amp, off, log_alpha, beta = best.x
    fitted = model(best.x)
    w2 = counts[used].astype(np.float64)
    wmean = float((w2 * mean).sum() / w2.sum())
    ss_tot = float((w2 * (mean - wmean) ** 2).sum())
    r2 = 1.0 - float((w2 * (fitted - mean) ** 2).sum()) / ss_tot if ss_tot > 0 else nan
    flags = []
    if beta <= lo * (1 + 1e-6) or beta >= hi * (1 - 1e-6):
        flags.append("beta_at_bound")
    if best.status <= 0:
        flags.append("not_converged")
    return ShapeExponentFit(beta=float(beta), alpha=float(np.exp(log_alpha)), amplitude=float(amp) * scale,
                            offset=float(off) * scale, r_squared=r2, flags=tuple(flags))


@dataclass(frozen=True)
class RadialProfile:
    """Mean of the map in complete rings about a centre (see :func:`radial_profile`)."""

    radii: np.ndarray
    values: np.ndarray
    counts: np.ndarray
    centre: tuple[float, float]
    bin_width: float
    whitened: bool


def radial_profile(image, centre, *, covariance=None, bin_width: float = 1.0) -> RadialProfile:
    """Mean value in rings of width ``bin_width`` about ``centre``, complete rings only.

    Parameters
    ----------
    image : array_like, shape (H, W)
    centre : (y, x)
    covariance : array_like (2, 2), optional
        If given, rings are ellipses of this shape (whitened distance, :func:`whitened_distance`); else circles.
    bin_width : float
        Ring width in pixels (of the geometric-mean σ when whitened).

    Returns
    -------
    RadialProfile
        ``radii`` are the ring mid-radii; only rings lying wholly inside the canvas are kept (none if the centre is off
        the canvas).
    """
    data = check_map(image)
    if not bin_width > 0:
        raise ValueError(f"bin_width must be positive, got {bin_width}")
    cy, cx = float(centre[0]), float(centre[1])
    height, width = data.shape
    if covariance is None:
        dist = np.hypot((np.arange(height) - cy)[:, None], (np.arange(width) - cx)[None, :])
        extent_y = extent_x = 1.0
    else:
        cov = np.asarray(covariance, dtype=np.float64)
        dist = whitened_distance(data.shape, (cy, cx), cov)
        sigma_geo = float(np.linalg.det(cov)) ** 0.25
        extent_y = np.sqrt(cov[0, 0]) / sigma_geo
        extent_x = np.sqrt(cov[1, 1]) / sigma_geo
    # the largest radius whose ring is entirely inside the canvas [−0.5, H−0.5] × [−0.5, W−0.5]
    r_max = min((cy + 0.5) / extent_y, (height - 0.5 - cy) / extent_y, (cx + 0.5) / extent_x,
                (width - 0.5 - cx) / extent_x)
    n_rings = int(np.floor(r_max / bin_width)) if np.isfinite(r_max) and r_max > 0 else 0
    if n_rings < 1:
        empty = np.zeros(0)
        return RadialProfile(empty, empty, np.zeros(0, dtype=np.int64), (cy, cx), bin_width, covariance is not None)
    index = np.floor(dist / bin_width).astype(np.int64).ravel()
    keep = index < n_rings
    counts = np.bincount(index[keep], minlength=n_rings)
    sums = np.bincount(index[keep], weights=data.ravel()[keep], minlength=n_rings)
    radii = (np.arange(n_rings) + 0.5) * bin_width
    used = counts > 0
    return RadialProfile(radii[used], sums[used] / counts[used], counts[used], (cy, cx), bin_width,
                         covariance is not None)


def radial_monotonicity(values, *, tolerance: float = 0.05, ring_prominence: float = 0.05) -> tuple[float, int]:
    """Monotonicity of a radial profile and the number of rings (agd-metrics.md §1.6).

    With m = values − min(values): monotonicity = fraction of k ≥ 1 with m_k ≤ m_{k−1}·(1 + ``tolerance``) +
    10⁻³·max(m); rings = number of interior local maxima whose prominence exceeds ``ring_prominence``·max(m).

    Returns
    -------
    (float, int)
        Monotonicity in [0, 1] (1 for a profile that never rises; NaN with fewer than 2 rings) and the ring count.

    Examples
    --------
    >>> radial_monotonicity([4, 3, 2, 1])
    (1.0, 0)
    >>> radial_monotonicity([1, 3, 1, 3, 1])
    (0.5, 2)
    """
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {m.shape}")
    if m.size < 2 or not np.all(np.isfinite(m)):
        return float("nan"), 0
    m = m - m.min()
    top = float(m.max())
    if not top > 0:
        return 1.0, 0
    ok = m[1:] <= m[:-1] * (1 + tolerance) + 1e-3 * top
    peaks, _ = find_peaks(m, prominence=ring_prominence * top)
    return float(ok.mean()), int(len(peaks))
