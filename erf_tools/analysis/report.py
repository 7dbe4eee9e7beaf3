"""The AGD report: every analysis of one ERF map, built from the pure functions of :mod:`erf_tools.analysis`.

:func:`analyze` takes an :class:`~erf_tools.results.ERFResult` (its per-image maps give bootstrap confidence
intervals and the convergence curve) or a bare 2-D array, and returns an :class:`AGDReport`. Measures are computed on
the raw map (``raw``: the map as given, normalised to sum 1 where a distribution is needed) and on the floor-removed
map (``floor_removed``: max(M − floor, 0), floor estimated by :func:`~erf_tools.analysis.maps.estimate_floor`); each
field says which. The AGD score removes the fitted offset instead (:mod:`erf_tools.analysis.shape`).

Failure policy: a map with NaN or Inf raises :class:`ValueError` (naming how many and where); an all-zero map gives a
report flagged ``empty_map`` with NaN measures; negative values are clipped at 0 and flagged
``negative_values_clipped``. Fits that fail are flagged, and their σ is not reported as the ERF size (NaN in
``spread``; the raw fitted values stay in ``fit``/``kim_fit`` with their flags).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .area import (AREA_THRESHOLDS, OPENERF_RADII, AreaRatio, area_ratio, effective_area, mass_radius,
                   radial_cumulative_mass, rank_area_sorted)
from .checkerboard import checkerboard_indices
from .gaussian_fit import GaussianFit, KimFit, fit_gaussian, fit_gaussian_kim, gaussian_model, params_from_ellipse
from .weighted_fit import WeightedGaussianFit, fit_gaussian_weighted
from .maps import check_map, estimate_floor, remove_floor
from .noise import (NoiseModel, estimate_map_noise, gain_adjusted_stack, gain_adjusted_standard_error,
                    noise_model_from_standard_error, standard_error_from_stack)
from .noise_shape import VARIANCE_SMOOTHING, noise_shape_from_stack
from .resample_grid import grid_fit, map_units_factor, resample_grid, usable
from .noise_free import (NoiseFreeScore, fit_noise_power, noise_free_agd, noise_free_r_squared,
                         score_from_hellinger_squared, world_map)
from .moments import Moments, argmax_position, image_moments
from .shape import (GAUSSIAN_MARDIA_KURTOSIS, ShapeExponentFit, agd_score, beta_from_kurtosis, fit_shape_exponent,
                    hellinger_to_moment_gaussian, mardia_kurtosis, radial_monotonicity, radial_profile)
from .uncertainty import BootstrapResult, ConvergenceCurve, bootstrap_maps, check_stack, convergence_curve

__all__ = ["AGDReport", "analyze", "DEFAULT_RESAMPLES"]

DEFAULT_RESAMPLES = 200
"""Default number of bootstrap resamples."""

MIN_IMAGES_FOR_NOISE = 8
"""Below this many images the per-pixel variances are too rough for a reliable noise correction (flagged)."""

MIN_IMAGES_FOR_BIAS_BOOTSTRAP = 32
"""From this many images the residual bootstrap's bias estimate corrects ``agd_score`` (:func:`analyze`). Below,
resamples of a few images (≈ 5 distinct ones out of 8, 10 out of 16) have per-pixel standard errors unlike the
data's: their H² spreads 20× wider than the estimator's own at 8 images (0.17 against 0.008 for a small Gaussian),
and at 16 the correction still over-states the bias: on the trained EfficientNet-Lite1, 16 disjoint 16-image sets
score 0.845 ± 0.007 corrected and 0.895 ± 0.008 without, against 0.896 from all 256; at 32 images 0.888 ± 0.004
against 0.908 ± 0.005 (bench/RESULTS.md, "fifth round")."""

HEADLINE = ("agd_score", "sigma_major", "sigma_minor", "r_squared", "beta2")
CORRECTED = ("agd_score_raw", "r_squared_raw", "hellinger_squared", "hellinger_squared_raw")


def _clean(value: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, non-finite floats to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "to_dict"):
        return _clean(value.to_dict())
    return value


def _moments_dict(mom: Moments | None, scale: float, input_side: float) -> dict:
    if mom is None:
        return {"centre_yx": None, "sigma_major": None, "sigma_minor": None, "theta_deg": None}
    return {"centre_yx": list(mom.centre), "sigma_major": mom.sigma_major * scale,
            "sigma_minor": mom.sigma_minor * scale, "sigma": mom.sigma * scale,
            "sigma_fraction": mom.sigma * scale / input_side, "theta_deg": float(np.degrees(mom.theta)),
            "anisotropy": mom.anisotropy}


@dataclass
class AGDReport:
    """How Gaussian an ERF is and how far it spreads; built by :func:`analyze`. ``to_dict()`` gives JSON-ready data.

    Headline: ``agd_score`` (the noise-free estimate of 1 − Hellinger distance to the fitted Gaussian, in [0, 2]:
    above 1 is a Gaussian within the noise; ``agd_score_raw`` is the score of the noisy map as given, in [0, 1]) and
    the fitted σ in ``spread["sigma_major"]``/``["sigma_minor"]`` (input pixels; NaN when the fit is flagged).
    ``flags`` lists everything that went wrong or needs care; ``not_gaussian`` is set when the fit failed or the AGD
    score is below the threshold given to :func:`analyze`. ``r_squared`` is the noise-corrected R² of the
    full-covariance fit (``r_squared_raw`` = ``fit.r_squared``); ``noise_model`` says where the per-pixel noise came
    from (``"per-image"`` or ``"map-only"``), ``noise`` describes it, ``noise_fit`` is the weighted fit with its χ².
    """

    agd_score: float
    flags: tuple[str, ...]
    map_shape: tuple[int, int]
    input_size: tuple[int, int]
    pixel_scale: float
    num_images: int | None
    protocol: str | None
    receptive_field_centre: tuple[float, float] | None
    floor: dict[str, Any]
    fit: GaussianFit
    kim_fit: KimFit
    shape: dict[str, Any]
    spread: dict[str, Any]
    area_ratios: tuple[AreaRatio, ...]
    checkerboard: dict[str, float]
    openerf_metrics: dict[str, Any]
    bootstrap: BootstrapResult | None = None
    confidence_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    convergence: ConvergenceCurve | None = None
    options: dict[str, Any] = field(default_factory=dict)
    agd_score_raw: float = float("nan")
    r_squared: float = float("nan")
    r_squared_raw: float = float("nan")
    noise_model: str | None = None
    noise: dict[str, Any] = field(default_factory=dict)
    noise_free: NoiseFreeScore | None = None
    noise_fit: WeightedGaussianFit | None = None
    bias_correction: dict[str, Any] = field(default_factory=lambda: {"applied": False, "reason": "no bootstrap"})

    @property
    def ok(self) -> bool:
        """True when the map is non-empty and the full-covariance fit is not flagged."""
        return "empty_map" not in self.flags and self.fit.ok

    def interval(self, name: str) -> tuple[float, float]:
        """Bootstrap confidence interval of a headline number (NaN, NaN when there was no bootstrap)."""
        return self.confidence_intervals.get(name, (float("nan"), float("nan")))

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready Python data (non-finite numbers become None)."""
        return _clean({
            "agd_score": self.agd_score, "flags": list(self.flags), "map_shape": self.map_shape,
            "input_size": self.input_size, "pixel_scale": self.pixel_scale, "num_images": self.num_images,
            "protocol": self.protocol, "receptive_field_centre_yx": self.receptive_field_centre,
            "floor": self.floor, "fit": self.fit.to_dict(), "kim_fit": self.kim_fit.to_dict(), "shape": self.shape,
            "spread": self.spread, "area_ratios": [a.to_dict() for a in self.area_ratios],
            "checkerboard": self.checkerboard, "openerf_metrics": self.openerf_metrics,
            "bootstrap": None if self.bootstrap is None else self.bootstrap.to_dict(),
            "confidence_intervals": {k: list(v) for k, v in self.confidence_intervals.items()},
            "convergence": None if self.convergence is None else self.convergence.to_dict(),
            "options": self.options, "agd_score_raw": self.agd_score_raw, "r_squared": self.r_squared,
            "r_squared_raw": self.r_squared_raw, "noise_model": self.noise_model, "noise": self.noise,
            "noise_free": None if self.noise_free is None else self.noise_free.to_dict(),
            "noise_fit": None if self.noise_fit is None else self.noise_fit.to_dict(),
            "bias_correction": self.bias_correction,
        })

    def _repr_html_(self) -> str:
        """The headline table in a notebook (erf_tools.display, imported here: this module stays NumPy/SciPy)."""
        from erf_tools.display import report_html

        return report_html(self)

    def summary(self) -> str:
        """A few lines for a terminal: the headline numbers with their intervals, and the flags."""

        def fmt(name, value, digits=3):
            low, high = self.interval(name)
            text = "nan" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"
            if np.isfinite(low) and np.isfinite(high):
                text += f" [{low:.{digits}f}, {high:.{digits}f}]"
            return text

        raw = self.agd_score_raw
        lines = [
            f"AGD score      {fmt('agd_score', self.agd_score)}  (noise-free estimate"
            f"{', bootstrap bias-corrected' if self.bias_correction.get('applied') else ''}; raw "
            f"{'nan' if not np.isfinite(raw) else f'{raw:.3f}'}; noise {self.noise_model or '-'})",
            f"sigma (px)     {fmt('sigma_major', self.spread['sigma_major'], 2)} / "
            f"{fmt('sigma_minor', self.spread['sigma_minor'], 2)}  (fit, major / minor)",
            f"R^2            {fmt('r_squared', self.r_squared)}  (raw {self.r_squared_raw:.3f}; "
            f"Kim-compatible {self.kim_fit.r_squared:.3f})",
            f"beta2 (Mardia) {fmt('beta2', self.shape['mardia_kurtosis'], 2)}  (Gaussian 8; floor removed)",
            f"beta (shape)   {self.shape['beta']:.2f}  (Gaussian 2)",
        ]
        for a in self.area_ratios:
            name = f"r({a.threshold:g})"
            lines.append(f"{name:<15}{'unreachable' if a.ratio is None else fmt(name, a.ratio, 4)}")
        lines.append(f"flags          {', '.join(self.flags) or '-'}")
        return "\n".join(lines)


def _unpack(result_or_map, per_image_maps, per_image_downsample):
    """(map, per-image stack, downsample, num_images, protocol, rf centre in input px, input size, options)."""
    if hasattr(result_or_map, "map") and hasattr(result_or_map, "per_image_maps"):
        r = result_or_map
        stack = r.per_image_maps if per_image_maps is None else per_image_maps
        down = int(getattr(r, "per_image_downsample", 1) or 1) if per_image_maps is None else per_image_downsample
        return (r.map, stack, down, getattr(r, "num_images", None), getattr(r, "protocol", None),
                getattr(r, "receptive_field_centre", None), getattr(r, "input_size", None),
                dict(getattr(r, "options", {}) or {}), getattr(r, "map_standard_error", None),
                getattr(r, "num_independent_images", None))
    array = np.asarray(result_or_map)
    if array.ndim == 3:  # a stack of per-image maps: analyse their mean
        stack = check_stack(array)
        return stack.mean(axis=0), stack, 1, stack.shape[0], None, None, None, {}, None, None
    n = None if per_image_maps is None else np.asarray(per_image_maps).shape[0]
    return array, per_image_maps, per_image_downsample, n, None, None, None, {}, None, None


def analyze(result_or_map, *, input_size: tuple[int, int] | None = None, bootstrap: int | None = DEFAULT_RESAMPLES,
            seed: int | None = 0, confidence: float = 0.95, receptive_field_centre: tuple[float, float] | None = None,
            per_image_maps=None, per_image_downsample: int = 1, floor: str | float = "border",
            thresholds=AREA_THRESHOLDS, r_squared_threshold: float = 0.5, agd_threshold: float = 0.85,
            bootstrap_side: int = 64, bootstrap_interval: str = "basic",
            convergence_tolerance: float = 0.05) -> AGDReport:
    """Analyse an ERF: Gaussian fits, AGD score and its components, spread, areas, checkerboard, uncertainty.

    Parameters
    ----------
    result_or_map : ERFResult or array_like
        An :class:`~erf_tools.results.ERFResult`, a 2-D map (H, W), or a stack (N, H, W) of per-image maps (their
        mean is analysed and the stack used for the bootstrap).
    input_size : (H, W), optional
        Size of the network input the map covers (default: the result's ``input_size`` or the map's shape). σ and
        radii are reported in input pixels (map pixels × ``pixel_scale``) and σ also as a fraction of √(H·W).
    bootstrap : int or None
        Number of bootstrap resamples over images (0 or None: no bootstrap). Needs per-image maps. From
        :data:`MIN_IMAGES_FOR_BIAS_BOOTSTRAP` images the resamples also correct ``agd_score`` for the bias the plug-in
        correction leaves (the residual bootstrap: each resample's deviation from the all-image mean is added to a
        smooth world map, :func:`~.noise_free.world_map`, whose own H² is known; the resamples' mean H² minus it is
        subtracted from the estimate). ``report.bias_correction`` says whether it was applied and by how much;
        ``report.noise_free.score`` is the plug-in estimate, the ``agd_score`` of ``bootstrap=0``.
    seed : int or None
        Seed for the bootstrap and the convergence curve.
    confidence : float
        Coverage of the bootstrap intervals.
    receptive_field_centre : (y, x), optional
        Analytic centre of the target unit's receptive field in input pixels (default: the result's). Used as an extra
        start of the fit and as the centre of radial masses and area ratios.
    per_image_maps, per_image_downsample : optional
        Per-image maps for a bare 2-D map (block-summed by ``per_image_downsample``).
    floor : "border", "percentile" or float
        How the floor is estimated (:func:`~erf_tools.analysis.maps.estimate_floor`), or its value.
    thresholds : sequence of float
        t for r(t), rank areas and mass radii.
    r_squared_threshold : float
        Fits with a lower R² are flagged ``low_r_squared``.
    agd_threshold : float
        Maps with a lower AGD score (or a failed fit) are flagged ``not_gaussian``.
    bootstrap_side : int
        Resamples are fitted on block means no larger than this per side (starting from the point estimate) and r(t)
        is evaluated on block sums no larger than 4× this; the intervals are translated by the difference between the
        full-resolution estimate and the reduced-resolution estimate from all images.
    bootstrap_interval : {"basic", "percentile"}
        ``"basic"`` (default, bias-corrected): θ̂ − (q − T), with q the resampled quantiles of the statistic and T its
        value in the bootstrap world (for ``agd_score`` and ``r_squared``, which correct their own noise bias, T is the
        raw score of the all-image mean, whose noise-free score the resamples estimate; for the others the statistic
        on the all-image mean), so that the bias the resamples show is removed from the interval. The AGD interval
        is formed on the H² scale and mapped to the score; with the residual bootstrap's correction it is the basic
        interval about the world map's H², else the resamples' spread about their median, re-centred.
        ``"percentile"``: θ̂ + (q − T) (the former intervals).
        A number outside its own interval is flagged ``noise_biased:<name>`` (its residual bias exceeds the
        interval: add images).
    convergence_tolerance : float
        Hellinger distance below which the mean map is regarded as no longer changing.

    Returns
    -------
    AGDReport

    Raises
    ------
    ValueError
        If the map is not 2-D, smaller than 3×3, or has NaN/Inf values; or the per-image maps are malformed.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        # degenerate maps (a single pixel, denormal values) produce NaN/inf intermediates; they end as flags or NaN
        return _analyze(result_or_map, input_size, bootstrap, seed, confidence, receptive_field_centre,
                        per_image_maps, per_image_downsample, floor, thresholds, r_squared_threshold, agd_threshold,
                        bootstrap_side, bootstrap_interval, convergence_tolerance)


def _analyze(result_or_map, input_size, bootstrap, seed, confidence, receptive_field_centre, per_image_maps,
             per_image_downsample, floor, thresholds, r_squared_threshold, agd_threshold, bootstrap_side,
             bootstrap_interval, convergence_tolerance) -> AGDReport:
    (raw, stack, down, num_images, protocol, rf_input, result_input, result_options, given_se,
     num_independent) = _unpack(result_or_map, per_image_maps, per_image_downsample)
    expects_stack = hasattr(result_or_map, "per_image_maps") or per_image_maps is not None
    data = check_map(raw)
    height, width = data.shape
    flags: list[str] = []
    if data.min() < 0:
        flags.append("negative_values_clipped")
        data = np.maximum(data, 0.0)
    in_size = tuple(int(v) for v in (input_size or result_input or data.shape))
    if len(in_size) != 2 or min(in_size) < 1:
        raise ValueError(f"input_size must be (H, W) with positive entries, got {input_size}")
    scale = float(np.sqrt(in_size[0] / height * in_size[1] / width))
    input_side = float(np.sqrt(in_size[0] * in_size[1]))
    rf_in = receptive_field_centre if receptive_field_centre is not None else rf_input
    rf_map = None
    if rf_in is not None:
        if len(rf_in) != 2 or not all(np.isfinite(rf_in)):
            raise ValueError(f"receptive_field_centre must be a finite (y, x), got {rf_in}")
        rf_map = tuple((float(c) + 0.5) * (n_map / n_in) - 0.5 for c, n_map, n_in in zip(rf_in, data.shape, in_size))
    options = {"floor": floor, "thresholds": list(thresholds), "r_squared_threshold": r_squared_threshold,
               "agd_threshold": agd_threshold, "bootstrap": bootstrap, "seed": seed, "confidence": confidence,
               "bootstrap_side": bootstrap_side,
               "bootstrap_interval": bootstrap_interval, "convergence_tolerance": convergence_tolerance,
               "result_options": result_options}

    peak = float(data.max())
    if isinstance(floor, str):
        floor_value = estimate_floor(data, method=floor)
        floor_method = floor
    else:
        floor_value, floor_method = float(floor), "given"
    floor_info = {"value": floor_value, "method": floor_method,
                  "fraction_of_peak": floor_value / peak if peak > 0 else float("nan"),
                  "mass_fraction": (float(np.minimum(data, floor_value).sum() / data.sum()) if peak > 0
                                    else float("nan"))}

    fit = fit_gaussian(data, floor=floor_value, centres=[rf_map] if rf_map is not None else (),
                       r_squared_threshold=r_squared_threshold)
    kim = fit_gaussian_kim(data, r_squared_threshold=r_squared_threshold)
    if peak <= 0:
        return _empty_report(flags + ["empty_map"], data.shape, in_size, scale, num_images, protocol, rf_map,
                             floor_info, fit, kim, thresholds, options)

    positive = remove_floor(data, floor_value)
    if not positive.sum() > 0:
        flags.append("nothing_above_floor")
        positive = data
    mom_raw = image_moments(data)
    mom_pos = image_moments(positive)
    score_raw = agd_score(data, fit)
    # the per-image maps, checked once; ``matching`` when they cover the map and can give per-pixel statistics
    checked = None if stack is None else check_stack(stack)
    down = int(down or 1)
    raw_matching = _matching_stack(data, checked, down)
    # the shape numbers are scale-free: a per-image gain is not noise of theirs (noise.gain_adjusted_stack)
    matching = None if raw_matching is None else gain_adjusted_stack(raw_matching)
    noise = _noise_model(data, given_se, raw_matching, matching, down, num_images, num_independent)
    noise_shape = None if matching is None else noise_shape_from_stack(matching)
    if noise.source == "map-only" and noise.reliability.get("correlated"):
        flags.append("map_noise_correlated")
    if noise.num_images is not None and noise.num_images < MIN_IMAGES_FOR_NOISE:
        flags.append("noise_from_few_images")  # per-pixel variances from < 8 images: the correction is rough
    if usable(fit):
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            model_map = fit.evaluate(data.shape)
        nf = noise_free_agd(data, fit.offset, model_map - fit.offset, noise.standard_error, model=model_map,
                            noise_shape=noise_shape, variance_smoothing=VARIANCE_SMOOTHING * down,
                            level_scale=float(down), centre=fit.centre, covariance=fit.covariance)
        r2, r2_raw = noise_free_r_squared(data, model_map, noise.standard_error,
                                          noise_power=_fit_noise_power(data, matching, down, fit))
        noise_fit = fit_gaussian_weighted(data, noise.standard_error, fit, r_squared_threshold=r_squared_threshold,
                                          variance_dof=(noise.num_images - 1) if noise.num_images else None)
    else:
        nf, r2, r2_raw, noise_fit = None, float("nan"), fit.r_squared, None
    score = nf.score if nf is not None and np.isfinite(score_raw) else score_raw
    if noise_fit is not None and np.isfinite(noise_fit.p_value) and noise_fit.p_value < 0.05:
        flags.append("gaussian_rejected_by_noise")

    # shape
    if fit.ok:
        centre, cov = fit.centre, fit.covariance
    else:
        centre, cov = mom_pos.centre, mom_pos.covariance
    shape_fit = (fit_shape_exponent(data, centre, cov) if np.linalg.det(cov) > 0 else
                 ShapeExponentFit(*(float("nan"),) * 5, ("singular_covariance",)))
    profile = radial_profile(data, centre, covariance=cov if fit.ok else None)
    monotonicity, rings = radial_monotonicity(profile.values)
    beta2 = mardia_kurtosis(positive)
    shape = {
        "agd_score": score, "agd_score_raw": score_raw,
        "hellinger": 1.0 - score if np.isfinite(score) else float("nan"),
        "hellinger_raw": 1.0 - score_raw if np.isfinite(score_raw) else float("nan"),
        "beta": shape_fit.beta, "beta_fit": shape_fit.to_dict(),
        "mardia_kurtosis": beta2, "mardia_kurtosis_raw": mardia_kurtosis(data),
        "mardia_kurtosis_gaussian": GAUSSIAN_MARDIA_KURTOSIS, "beta_from_kurtosis": beta_from_kurtosis(beta2),
        "monotonicity": monotonicity, "rings": rings,
        "radial_profile": {"radii": profile.radii * scale, "values": profile.values, "centre_yx": profile.centre,
                           "whitened": profile.whitened},
        "anisotropy": fit.anisotropy if fit.ok else mom_pos.anisotropy,
        "anisotropy_source": "fit" if fit.ok else "moments_floor_removed",
        "hellinger_moment_gaussian_raw": hellinger_to_moment_gaussian(data),
        "hellinger_moment_gaussian": hellinger_to_moment_gaussian(positive),
        "measured_on": {"agd_score": "fitted offset removed, noise-free estimate",
                        "agd_score_raw": "fitted offset removed, noisy map", "mardia_kurtosis": "floor_removed",
                        "mardia_kurtosis_raw": "raw", "beta": "raw (fitted offset)", "monotonicity": "raw"},
    }

    # spread
    nan = float("nan")
    sig_major = fit.sigma_major * scale if fit.ok else nan
    sig_minor = fit.sigma_minor * scale if fit.ok else nan
    eff_raw, eff_pos = effective_area(data), effective_area(positive)
    image_centre = (height // 2, width // 2)
    descending = np.sort(data.ravel())[::-1]
    centres = {"image_centre": image_centre, "centre_of_mass": mom_raw.centre}
    if rf_map is not None:
        centres["receptive_field_centre"] = rf_map
    spread = {
        "sigma_major": sig_major, "sigma_minor": sig_minor, "sigma": math.sqrt(sig_major * sig_minor),
        "sigma_major_fraction": sig_major / input_side, "sigma_minor_fraction": sig_minor / input_side,
        "sigma_fraction": math.sqrt(sig_major * sig_minor) / input_side,
        "sigma_source": "full-covariance fit" if fit.ok else "fit flagged: not reported",
        "moments_raw": _moments_dict(mom_raw, scale, input_side),
        "moments_floor_removed": _moments_dict(mom_pos, scale, input_side),
        "rank_area_raw": dict(zip(map(float, thresholds), rank_area_sorted(descending, thresholds))),
        "rank_area_floor_removed": dict(zip(map(float, thresholds), rank_area_sorted(
            descending, thresholds, floor=0.0 if positive is data else floor_value))),
        "effective_area_raw": {"area": eff_raw.area * scale**2, "ratio": eff_raw.ratio, "sigma": eff_raw.sigma * scale},
        "effective_area_floor_removed": {"area": eff_pos.area * scale**2, "ratio": eff_pos.ratio,
                                         "sigma": eff_pos.sigma * scale},
        "radial_mass": {name: {"centre_yx": list(c), "radii": list(OPENERF_RADII),
                               "mass": list(radial_cumulative_mass(data, c, OPENERF_RADII).values())}
                        for name, c in centres.items()},
        "mass_radius": {name: dict(zip(map(float, thresholds), (r * scale for r in mass_radius(data, c, thresholds))))
                        for name, c in centres.items()},
        "units": "input pixels (map pixels x pixel_scale); fractions of sqrt(H*W) of the input",
    }
    ratios = area_ratio(data, thresholds)
    if rf_map is not None:
        spread["area_ratio_receptive_field_centre"] = [a.to_dict() for a in area_ratio(data, thresholds,
                                                                                       centre=rf_map)]
    unreachable = [a.threshold for a in ratios if not a.reachable]
    if unreachable:
        flags.append("area_ratio_unreachable")
    l1, l2 = checkerboard_indices(data)
    checker = {"l1": l1, "l2": l2, "normalisation": "max"}
    argmax = argmax_position(data)
    openerf = {"shape": list(data.shape), "sum": float(data.sum()), "min": float(data.min()), "max": peak,
               "argmax_yx": list(argmax), "center_yx": list(image_centre),
               "center_value": float(data[image_centre]), "com_x": mom_raw.centre[1], "com_y": mom_raw.centre[0],
               "radial_cumulative_mass": {str(r): v for r, v in
                                          radial_cumulative_mass(data, image_centre, OPENERF_RADII).items()}}

    flags += [f"fit:{f}" for f in fit.flags] + [f"kim_fit:{f}" for f in kim.flags]
    flags += [f"beta_fit:{f}" for f in shape_fit.flags]
    if not fit.ok or not (np.isfinite(score) and score >= agd_threshold):
        flags.append("not_gaussian")

    report = AGDReport(agd_score=score, flags=(), map_shape=(height, width), input_size=in_size, pixel_scale=scale,
                       num_images=num_images, protocol=protocol, receptive_field_centre=rf_map, floor=floor_info,
                       fit=fit, kim_fit=kim, shape=shape, spread=spread, area_ratios=ratios, checkerboard=checker,
                       openerf_metrics=openerf, options=options, agd_score_raw=score_raw, r_squared=r2,
                       r_squared_raw=r2_raw, noise_model=noise.noise_model,
                       noise={**noise.to_dict(), "shape": (noise_shape.to_dict() if noise_shape is not None else
                                                           {"source": "normal"})}, noise_free=nf,
                       noise_fit=noise_fit)

    # uncertainty
    n_boot = int(bootstrap or 0)
    if checked is not None:
        stack = checked
        h, w = stack.shape[1:]
        if abs(h * down - height) > down or abs(w * down - width) > down:
            flags.append("per_image_shape_mismatch")
        else:
            if stack.shape[0] >= 2:
                report.convergence = convergence_curve(stack, tolerance=convergence_tolerance, seed=seed)
            if n_boot > 0 and stack.shape[0] >= 2:
                flags += _bootstrap(report, data, stack, down, n_boot, confidence, seed, floor, floor_value,
                                    thresholds, r_squared_threshold, bootstrap_side, bootstrap_interval,
                                    noise_shape)
            elif n_boot > 0:
                flags.append("bootstrap_needs_two_images")
    elif n_boot > 0 and expects_stack:
        flags.append("no_per_image_maps")
    report.flags = tuple(dict.fromkeys(flags))
    return report


def _bootstrap(report, data, stack, down, n_boot, confidence, seed, floor, floor_value, thresholds,
               r_squared_threshold, bootstrap_side, method, noise_shape=None):
    """Fill ``report.bootstrap`` and ``report.confidence_intervals`` (see :func:`analyze`).

    Each resample's mean map is formed from the per-image maps block-summed to ≤ 4·``bootstrap_side`` px per side.
    On it: r(t) with the side interpolated between squares (whole sides are too coarse at reduced resolution), the AGD
    score, β₂, and a fit started from the point estimate on ≤ ``bootstrap_side``² block means (σ corrected for the
    blocks). The intervals are then translated by (full-resolution estimate − reduced-resolution estimate from all
    images), so they are centred like the full-resolution numbers.
    """
    grid = resample_grid(data, stack, down, report.fit, bootstrap_side)
    stored, first, factor, added = grid.stored, grid.first, grid.factor, grid.added
    errors = gain_adjusted_stack(stored)
    # the H² of a resample is scored in the residual bootstrap's world (its mean map shifted onto the world map),
    # every other number on the plain resample; below MIN_IMAGES_FOR_BIAS_BOOTSTRAP images there is no world
    world = (_residual_world(grid, stored, errors, floor=floor, floor_value=floor_value,
                             bootstrap_side=bootstrap_side, r_squared_threshold=r_squared_threshold)
             if stored.shape[0] >= MIN_IMAGES_FOR_BIAS_BOOTSTRAP else None)

    def fit_on_grid(m):
        return _grid_fit_and_model(m, grid, floor=floor, floor_value=floor_value, bootstrap_side=bootstrap_side,
                                   r_squared_threshold=r_squared_threshold)

    def hellinger(m, se, g, model):
        return noise_free_agd(m, g.offset, model - g.offset, se, model=model, noise_shape=noise_shape,
                              variance_smoothing=VARIANCE_SMOOTHING / first, level_scale=1.0 / first,
                              centre=g.centre, covariance=g.covariance)

    def statistic(mean_block_sums, se_block_sums):
        m = grid.mean_map(mean_block_sums)
        out = {k: float("nan") for k in HEADLINE + CORRECTED}
        out.update({f"r({t:g})": float("nan") for t in thresholds})
        if not m.max() > 0 or min(m.shape) < 3:
            return out
        for a in area_ratio(m, thresholds, interpolate=True):
            out[f"r({a.threshold:g})"] = a.ratio if a.ratio is not None else float("nan")
        g, f_floor, model = fit_on_grid(m)
        se = grid.mean_map(se_block_sums)
        if model is not None:
            nf = hellinger(m, se, g, model)
            out["agd_score"], out["agd_score_raw"] = nf.score, nf.raw
            out["hellinger_squared"], out["hellinger_squared_raw"] = nf.hellinger_squared, nf.hellinger_squared_raw
            out["r_squared"], out["r_squared_raw"] = noise_free_r_squared(m, model, se)
        if world is not None:
            # the world's map plus the resampled images' deviations from their mean (it may dip below 0)
            shifted = m + world
            gw, _, model_w = fit_on_grid(shifted)
            nf = hellinger(shifted, se, gw, model_w) if model_w is not None else None
            out["hellinger_squared"] = nf.hellinger_squared if nf is not None else float("nan")
            out["hellinger_squared_raw"] = nf.hellinger_squared_raw if nf is not None else float("nan")
        if g.ok:
            out["sigma_major"] = math.sqrt(max(factor**2 * g.sigma_major**2 - added, 0.0)) * report.pixel_scale
            out["sigma_minor"] = math.sqrt(max(factor**2 * g.sigma_minor**2 - added, 0.0)) * report.pixel_scale
        positive = remove_floor(m, f_floor)
        if positive.sum() > 0:
            out["beta2"] = mardia_kurtosis(positive)
        return out

    result = bootstrap_maps(stored, statistic, n_resamples=n_boot, confidence=confidence, seed=seed,
                            with_standard_error=True, error_maps=errors)
    nf = report.noise_free
    full = {"agd_score": report.agd_score, "sigma_major": report.spread["sigma_major"],
            "sigma_minor": report.spread["sigma_minor"], "r_squared": report.r_squared,
            "beta2": report.shape["mardia_kurtosis"], "agd_score_raw": report.agd_score_raw,
            "r_squared_raw": report.r_squared_raw,
            "hellinger_squared": nf.hellinger_squared if nf is not None else float("nan")}
    full.update({f"r({a.threshold:g})": (a.ratio if a.ratio is not None else float("nan")) for a in report.area_ratios})
    # the bootstrap world's truth: a noise-corrected statistic of a resample estimates the raw statistic of the
    # resamples' mean map (for H² from 32 images the world map, else the all-image mean); every other statistic
    # estimates itself on the all-image mean
    truth_of = {"agd_score": "agd_score_raw", "r_squared": "r_squared_raw", "hellinger_squared": "hellinger_squared_raw"}
    h2_samples = result.samples.get("hellinger_squared", np.array([]))
    correction = _bias_correction(h2_samples, result.estimate.get("hellinger_squared_raw", float("nan")),
                                  full["hellinger_squared"], world is not None, stored.shape[0])
    if correction["applied"]:
        full["hellinger_squared"] = correction["hellinger_squared"]
        full["agd_score"] = report.agd_score = score_from_hellinger_squared(correction["hellinger_squared"],
                                                                             signed=True)
        report.shape["agd_score"] = report.agd_score
    report.bias_correction = correction
    alpha = (1 - confidence) / 2
    intervals = {}
    biased = []
    for name, values in result.samples.items():
        if name in ("agd_score", "agd_score_raw", "r_squared_raw", "hellinger_squared_raw") or name not in full:
            continue
        finite = values[np.isfinite(values)]
        truth = result.estimate.get(truth_of.get(name, name), float("nan"))
        if finite.size < max(1, values.size / 2) or not np.isfinite(truth) or not np.isfinite(full[name]):
            intervals[name] = (float("nan"), float("nan"))
            continue
        q_lo, q_hi = float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))
        if name == "hellinger_squared" and correction["applied"]:
            # the basic interval about the world's truth: θ̂ − (q − T), θ̂ already corrected by mean − T
            centre = float(np.mean(finite))
            low, high = full[name] - (q_hi - centre), full[name] - (q_lo - centre)
        elif name in truth_of:
            # noise-corrected statistics: the resamples' spread about their median, re-centred on the estimate (their
            # bootstrap-world truth, the raw statistic of a noisy map, is one the correction is not calibrated for)
            centre = float(np.median(finite))
            low, high = full[name] + (q_lo - centre), full[name] + (q_hi - centre)
        elif method == "basic":
            low, high = full[name] - (q_hi - truth), full[name] - (q_lo - truth)
        else:
            low, high = full[name] + (q_lo - truth), full[name] + (q_hi - truth)
        intervals[name] = (low, high)
    h2 = intervals.pop("hellinger_squared", (float("nan"), float("nan")))
    # the AGD interval on the H² scale, where the estimator is smooth, mapped to the score (1 − √H² is monotone)
    intervals["agd_score"] = (score_from_hellinger_squared(h2[1], signed=True),
                              score_from_hellinger_squared(h2[0], signed=True))
    for name, (low, high) in list(intervals.items()):
        low, high = _clip_interval(name, low, high)
        intervals[name] = (low, high)
        value = full.get(name, np.nan)
        if np.isfinite(value) and np.isfinite(low) and not low <= value <= high:
            biased.append(name)
    report.bootstrap = result
    report.confidence_intervals = intervals
    report.options["bootstrap_block"] = factor
    return [f"noise_biased:{name}" for name in biased]


def _residual_world(grid, stored, errors, *, floor, floor_value, bootstrap_side, r_squared_threshold):
    """The shift (world map − all-image mean) of the residual bootstrap's world on the resample grid, or None when the
    all-image map has no usable fit. Resamples are scored as world map + (resample mean − all-image mean), the world
    map being the all-image map's fit plus its significant ring profile (:func:`~.noise_free.world_map`)."""
    mean = grid.mean_map(stored.mean(axis=0))
    n = stored.shape[0]
    if n < 2:
        return None
    standard_error = grid.mean_map(np.sqrt(errors.var(axis=0, ddof=1) / n))
    fit, _, model = _grid_fit_and_model(mean, grid, floor=floor, floor_value=floor_value,
                                        bootstrap_side=bootstrap_side, r_squared_threshold=r_squared_threshold)
    if model is None:
        return None
    return world_map(mean, model, standard_error, fit.centre, fit.covariance) - mean


def _grid_fit_and_model(m, grid, **fit_options):
    """(fit, floor, fitted model map or None when the fit is not usable) of a map on the resample grid."""
    g, f_floor = grid_fit(m, grid, **fit_options)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return g, f_floor, (g.evaluate(m.shape) if usable(g) else None)


def _bias_correction(h2_samples, h2_world, h2_estimate, has_world: bool, num_images: int) -> dict[str, Any]:
    """The residual bootstrap's bias correction of the noise-free H² (see :func:`analyze`): the resamples' mean H²
    minus the world's own H², subtracted from the estimate when there are enough images and finite resamples."""
    finite = np.asarray(h2_samples, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    info: dict[str, Any] = {"applied": False, "method": "residual bootstrap about the world map",
                            "min_images": MIN_IMAGES_FOR_BIAS_BOOTSTRAP, "num_images": int(num_images),
                            "hellinger_squared_plug_in": float(h2_estimate),
                            "hellinger_squared_world": float(h2_world) if has_world else float("nan")}
    if num_images < MIN_IMAGES_FOR_BIAS_BOOTSTRAP:
        return {**info, "reason": f"fewer than {MIN_IMAGES_FOR_BIAS_BOOTSTRAP} images"}
    if not has_world:
        return {**info, "reason": "no usable fit of the all-image map on the resample grid"}
    if finite.size < max(2, h2_samples.size / 2) or not (np.isfinite(h2_world) and np.isfinite(h2_estimate)):
        return {**info, "reason": "too few finite resamples"}
    bias = float(finite.mean()) - float(h2_world)
    return {**info, "applied": True, "reason": "", "hellinger_squared_bias": bias,
            "hellinger_squared_bias_se": float(finite.std(ddof=1) / np.sqrt(finite.size)),
            "hellinger_squared": float(h2_estimate) - bias}


def _matching_stack(data, checked, down: int) -> np.ndarray | None:
    """The checked per-image stack when it has ≥ 2 maps covering ``data`` in blocks of ``down`` px, else None."""
    if checked is None or checked.shape[0] < 2:
        return None
    h, w = checked.shape[1:]
    if abs(h * down - data.shape[0]) > down or abs(w * down - data.shape[1]) > down:
        return None
    return checked


def _fit_noise_power(data, stack, down: int, fit: GaussianFit) -> tuple[float, float] | None:
    """The noise left in the fit's residual, from full-resolution per-image maps (None: independent pixels)."""
    if stack is None or down != 1 or stack.shape[1:] != data.shape:
        return None
    params = params_from_ellipse(fit.amplitude, fit.offset, fit.centre, fit.sigma_major, fit.sigma_minor, fit.theta)
    _, jacobian = gaussian_model(params, np.arange(data.shape[0], dtype=np.float64),
                                 np.arange(data.shape[1], dtype=np.float64), jacobian=True)
    to_map_units = map_units_factor(data, stack, down)
    if not np.all(np.isfinite(jacobian)) or to_map_units is None:
        return None
    residual, spread = fit_noise_power(stack, jacobian)
    return residual * to_map_units**2, spread * to_map_units**2


def _noise_model(data, given_se, raw_stack, stack, down: int, num_images, num_independent) -> NoiseModel:
    """The per-pixel standard error of ``data``: given (engine; gain-adjusted when the per-image maps are there),
    from the gain-adjusted per-image stack ``stack`` covering the map (:func:`_matching_stack`), or from the map
    alone."""
    if given_se is not None:
        model = noise_model_from_standard_error(given_se, data.shape, num_images=num_images,
                                                num_independent_images=num_independent)
        if stack is None:
            return NoiseModel(model.standard_error, model.source, model.num_images, num_independent,
                              {**model.reliability, "gain_adjusted": False})
        se = gain_adjusted_standard_error(model.standard_error, raw_stack, stack, downsample=down)
        return NoiseModel(se, model.source, model.num_images, num_independent,
                          {**model.reliability, "gain_adjusted": True})
    if stack is not None:
        to_map_units = map_units_factor(data, stack, down)
        model = standard_error_from_stack(stack, data.shape, downsample=down,
                                          to_map_units=1.0 if to_map_units is None else to_map_units)
        return NoiseModel(model.standard_error, model.source, model.num_images, num_independent,
                          {**model.reliability, "gain_adjusted": True})
    return estimate_map_noise(data)


def _clip_interval(name: str, low: float, high: float) -> tuple[float, float]:
    """Keep translated/reflected interval ends inside the range of the statistic."""
    if name in ("r_squared", "r_squared_raw"):
        return min(low, 1.0), min(high, 1.0)
    if name == "agd_score":  # the signed root of H² (score_from_hellinger_squared): above 1 within the noise
        return float(np.clip(low, 0.0, 2.0)), float(np.clip(high, 0.0, 2.0))
    if name == "agd_score_raw" or name.startswith("r("):
        return float(np.clip(low, 0.0, 1.0)), float(np.clip(high, 0.0, 1.0))
    return max(low, 0.0), max(high, 0.0)


def _empty_report(flags, shape, in_size, scale, num_images, protocol, rf_map, floor_info, fit, kim, thresholds,
                  options) -> AGDReport:
    nan = float("nan")
    ratios = tuple(AreaRatio(float(t), None, None, None, (shape[0] // 2, shape[1] // 2), "log10") for t in thresholds)
    spread = {"sigma_major": nan, "sigma_minor": nan, "sigma": nan, "sigma_major_fraction": nan,
              "sigma_minor_fraction": nan, "sigma_fraction": nan, "sigma_source": "empty map"}
    shape_measures = {"agd_score": nan, "hellinger": nan, "beta": nan, "mardia_kurtosis": nan,
                      "mardia_kurtosis_raw": nan, "beta_from_kurtosis": nan, "monotonicity": nan, "rings": 0,
                      "anisotropy": nan}
    return AGDReport(agd_score=nan, flags=tuple(dict.fromkeys(flags + ["not_gaussian"])), map_shape=tuple(shape),
                     input_size=in_size, pixel_scale=scale, num_images=num_images, protocol=protocol,
                     receptive_field_centre=rf_map, floor=floor_info, fit=fit, kim_fit=kim, shape=shape_measures,
                     spread=spread, area_ratios=ratios, checkerboard={"l1": nan, "l2": nan, "normalisation": "max"},
                     openerf_metrics={}, options=options)
