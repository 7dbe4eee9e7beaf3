"""Gaussian-ness (AGD) and spread analysis of ERF maps: pure NumPy/SciPy functions plus the :func:`analyze` report.

One module per concern (functions first, the report is built from them):

* :mod:`.maps` — validation, floor estimation/removal, normalisation, block reduction;
* :mod:`.moments` — centre of mass, covariance, moment ellipse;
* :mod:`.gaussian_fit` — full-covariance Gaussian fit with offset; Kim et al. / OpenERF-compatible fit;
* :mod:`.weighted_fit` — the same fit weighted by the per-pixel standard errors, with its χ² against the noise;
* :mod:`.shape` — AGD score (Hellinger), Mardia kurtosis, generalised-Gaussian exponent β, radial monotonicity;
* :mod:`.area` — RepLKNet area ratio r(t), rank area, effective area, radial mass;
* :mod:`.checkerboard` — Kim et al. L1/L2 imbalance indices;
* :mod:`.noise` — per-pixel standard error of a map (per-image statistics or map-only estimate);
* :mod:`.noise_shape` — the shape of a pixel's noise at N images (pooled per-image residuals, or normal);
* :mod:`.noise_free` — noise-free AGD score and R² (bias correction with per-pixel expectations under that shape);
* :mod:`.uncertainty` — bootstrap over images, convergence curve;
* :mod:`.agreement` — do two maps of one model agree within their noise (per-pixel and 8×8-block z², a null at the
  statistic's own image counts);
* :mod:`.report` — :class:`AGDReport` and :func:`analyze`.

Nothing here imports torch or the models.
"""
from .area import (AREA_THRESHOLDS, OPENERF_RADII, AreaRatio, EffectiveArea, area_ratio, effective_area,
                   mass_radius, radial_cumulative_mass, rank_area, rank_area_sorted)
from .checkerboard import checkerboard_indices
from .gaussian_fit import FAILURE_FLAGS, GaussianFit, KimFit, fit_gaussian, fit_gaussian_kim, gaussian_2d, r_squared
from .weighted_fit import WeightedGaussianFit, fit_gaussian_weighted
from .maps import block_reduce, check_distribution, check_map, estimate_floor, normalise, remove_floor
from .moments import (Moments, argmax_position, centre_of_mass, covariance, covariance_from_ellipse,
                      ellipse_from_covariance, image_moments)
from .noise import NoiseModel, estimate_map_noise, standard_error_from_stack
from .noise_shape import NoiseShape, noise_shape_from_stack
from .noise_free import NoiseFreeScore, noise_free_agd, noise_free_r_squared
from .report import DEFAULT_RESAMPLES, AGDReport, analyze
from .shape import (RadialProfile, ShapeExponentFit, agd_score, bhattacharyya_coefficient, beta_from_kurtosis,
                    fit_shape_exponent, generalised_gaussian_kurtosis, hellinger_distance,
                    hellinger_to_moment_gaussian, mardia_kurtosis, moment_matched_gaussian, radial_monotonicity,
                    radial_profile, whitened_distance)
from .uncertainty import BootstrapResult, ConvergenceCurve, bootstrap_maps, convergence_curve

__all__ = [
    "analyze", "AGDReport", "DEFAULT_RESAMPLES",
    # maps
    "check_map", "check_distribution", "estimate_floor", "remove_floor", "normalise", "block_reduce",
    # moments
    "Moments", "image_moments", "centre_of_mass", "covariance", "ellipse_from_covariance", "covariance_from_ellipse",
    "argmax_position",
    # fits
    "GaussianFit", "KimFit", "FAILURE_FLAGS", "fit_gaussian", "fit_gaussian_kim", "gaussian_2d", "r_squared",
    "WeightedGaussianFit", "fit_gaussian_weighted",
    # noise
    "NoiseModel", "estimate_map_noise", "standard_error_from_stack", "NoiseFreeScore", "noise_free_agd",
    "noise_free_r_squared", "NoiseShape", "noise_shape_from_stack",
    # shape
    "agd_score", "hellinger_distance", "bhattacharyya_coefficient", "moment_matched_gaussian",
    "hellinger_to_moment_gaussian", "mardia_kurtosis", "generalised_gaussian_kurtosis", "beta_from_kurtosis",
    "ShapeExponentFit", "fit_shape_exponent", "RadialProfile", "radial_profile", "radial_monotonicity",
    "whitened_distance",
    # areas
    "AREA_THRESHOLDS", "OPENERF_RADII", "AreaRatio", "area_ratio", "rank_area", "rank_area_sorted", "EffectiveArea",
    "effective_area", "radial_cumulative_mass", "mass_radius",
    # checkerboard
    "checkerboard_indices",
    # uncertainty
    "BootstrapResult", "bootstrap_maps", "ConvergenceCurve", "convergence_curve",
]
