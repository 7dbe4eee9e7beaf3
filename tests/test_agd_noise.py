"""Issue 13: the AGD score estimates the noise-free score; noise models, weighted fit, result-file contract.

The simulation cases (bench/agd_noise_cases.py) have an analytic noise-free mean map, so the true score is known.
The large version is bench/bench_agd_noise.py (table in bench/RESULTS.md).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from erf_tools.analysis import analyze, fit_gaussian, gaussian_2d
from erf_tools.analysis.weighted_fit import fit_gaussian_weighted
from erf_tools.analysis.noise import estimate_map_noise
from erf_tools.analysis.noise_free import (expected_positive_part, expected_sqrt_positive, noise_free_agd,
                                           noise_free_r_squared)
from erf_tools.results import ERFResult, load_result, save_result

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from agd_noise_cases import SHAPES, draw, shape, true_score  # noqa: E402


def test_exact_expectations_match_monte_carlo():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(400_000)
    for x in (-1.5, -0.3, 0.0, 0.4, 2.0, 30.0):
        mc_pos = np.maximum(x + 0.7 * z, 0).mean()
        mc_sqrt = np.sqrt(np.maximum(x + 0.7 * z, 0)).mean()
        assert expected_positive_part(x, 0.7) == pytest.approx(mc_pos, abs=4e-3)
        assert expected_sqrt_positive(x, 0.7) == pytest.approx(mc_sqrt, abs=4e-3)
    assert expected_sqrt_positive(4.0, 0.0) == 2.0 and expected_positive_part(-1.0, 0.0) == 0.0


def test_noise_free_score_of_a_clean_map_is_the_raw_score():
    g = gaussian_2d((48, 48), (23.0, 25.0), 6.0, 4.0, 0.4) + 0.01
    fit = fit_gaussian(g)
    nf = noise_free_agd(g, fit.offset, fit.evaluate(with_offset=False), 0.0)
    assert nf.score == pytest.approx(nf.raw, abs=1e-12) and nf.score > 0.99
    r2, r2_raw = noise_free_r_squared(g, fit.evaluate(), 0.0)
    assert r2 == pytest.approx(r2_raw, abs=1e-12)


def test_r_squared_correction_removes_the_noise_variance():
    rng = np.random.default_rng(1)
    g = gaussian_2d((64, 64), (31.5, 31.5), 8.0, 8.0)
    disk = (np.hypot(*np.mgrid[-31.5:32.5, -31.5:32.5]) < 12).astype(float)
    truth = 0.7 * g + 0.3 * disk
    r2_true = noise_free_r_squared(truth, fit_gaussian(truth).evaluate(), 0.0)[1]
    corrected, raw = [], []
    for _ in range(6):
        noisy = truth + 0.1 * rng.standard_normal(truth.shape)
        c, r = noise_free_r_squared(noisy, fit_gaussian(noisy).evaluate(), 0.1)
        corrected.append(c)
        raw.append(r)
    assert np.mean(raw) < r2_true - 0.05  # noise lowers R² a lot here
    assert np.mean(corrected) == pytest.approx(r2_true, abs=0.01)


def test_map_only_noise_estimate_follows_a_signal_dependent_level():
    rng = np.random.default_rng(2)
    g = gaussian_2d((128, 128), (63.5, 63.5), 14.0, 14.0)
    s_true = 0.01 + 0.05 * g  # noise growing with the signal, like ReLU'd gradients
    noisy = g + s_true * rng.standard_normal(g.shape)
    noise = estimate_map_noise(noisy)
    ratio = noise.standard_error / s_true
    assert noise.noise_model == "map-only"
    assert np.median(ratio) == pytest.approx(1.0, abs=0.1)
    assert np.median(ratio[g > 0.5]) == pytest.approx(1.0, abs=0.25)
    assert not noise.reliability["correlated"]
    smooth = gaussian_2d((128, 128), (63.5, 63.5), 14.0, 14.0) + 0.01 * np.cumsum(
        rng.standard_normal((128, 128)), axis=1) / 10  # spatially correlated noise is detected
    assert estimate_map_noise(smooth).reliability["correlated"]


def test_weighted_fit_chi2_accepts_a_gaussian_and_rejects_a_disk():
    rng = np.random.default_rng(3)
    g = gaussian_2d((64, 64), (31.0, 33.0), 7.0, 5.0, 0.3)
    se = np.full(g.shape, 0.02)
    noisy = g + se * rng.standard_normal(g.shape)
    wfit = fit_gaussian_weighted(noisy, se, fit_gaussian(noisy))
    assert wfit.chi2_per_dof == pytest.approx(1.0, abs=0.06) and wfit.p_value > 0.01
    assert wfit.fit.sigma_major == pytest.approx(7.0, rel=0.03)
    disk = (np.hypot(*np.mgrid[-31.5:32.5, -31.5:32.5]) < 10).astype(float) + se * rng.standard_normal(g.shape)
    assert fit_gaussian_weighted(disk, se, fit_gaussian(disk)).p_value < 1e-6


def test_report_fields_and_noise_paths():
    t = shape("gauss_large", 48)
    stack = draw(t, "relu", 0.3, 16, np.random.default_rng(4))
    per_image = analyze(stack, bootstrap=0)
    assert per_image.noise_model == "per-image" and per_image.noise["num_images"] == 16
    assert per_image.agd_score > per_image.agd_score_raw
    assert per_image.r_squared >= per_image.r_squared_raw
    data = per_image.to_dict()
    for key in ("agd_score_raw", "r_squared", "r_squared_raw", "noise_model", "noise", "noise_free", "noise_fit"):
        assert key in data
    assert data["noise_fit"]["p_value"] is not None
    bare = analyze(stack.mean(axis=0), bootstrap=0)
    assert bare.noise_model == "map-only" and "reliability" in bare.noise
    given = analyze(_result(stack), bootstrap=0)
    assert given.noise["source"] == "per-image"
    # the engine's exact second moments give the same standard errors; without per-image maps the noise shape is
    # the normal one, with them the pooled per-image residuals' (right-skewed for ReLU'd maps)
    assert given.noise["shape"]["source"] == "normal"
    assert per_image.noise["shape"]["source"] == "per-image residuals" and per_image.noise["shape"]["skewness"] > 0
    assert given.agd_score == pytest.approx(per_image.agd_score, abs=0.01)


def _result(stack: np.ndarray) -> ERFResult:
    n = stack.shape[0]
    return ERFResult(map=stack.mean(axis=0).astype(np.float64), per_image_maps=None, per_image_downsample=1,
                     num_images=n, num_rejected=0, rejected_images=[], image_ids=[], target="t",
                     feature_shape=(1, 1, 1), centre_unit=(0, 0), receptive_field_centre=None,
                     total_stride=(1.0, 1.0), input_size=stack.shape[1:], model="m", protocol="replknet", options={},
                     weights={}, image_source={}, preprocessing={},
                     map_standard_error=stack.std(axis=0, ddof=1) / np.sqrt(n), num_independent_images=n)


def test_result_file_keeps_the_standard_error_and_old_files_load(tmp_path):
    stack = draw(shape("disk", 24), "relu", 0.3, 4, np.random.default_rng(5))
    result = _result(stack)
    save_result(result, tmp_path / "r")
    loaded = load_result(tmp_path / "r")
    np.testing.assert_array_equal(loaded.map_standard_error, result.map_standard_error)
    assert loaded.num_independent_images == 4
    old = _result(stack)
    old.map_standard_error, old.num_independent_images = None, None
    save_result(old, tmp_path / "old")
    again = load_result(tmp_path / "old")
    assert again.map_standard_error is None and again.num_independent_images is None


# --- simulation: bias and coverage against the known noise-free score ---------------------------------------------
# Size 40 px, per-image ReLU'd white noise of s.d. 0.3 × the peak, 8 repetitions, 30 resamples: the CI version of
# bench/bench_agd_noise.py. Asserted for every case: the noise-free score is closer to the truth than the raw score.
# The targets (coverage ≥ 0.9, |bias| < half-width / 4) are asserted where they hold (see bench/RESULTS.md
# for the cases where they do not yet).
SIM_N = (8, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHAPES)
def test_noise_free_score_is_less_biased_than_the_raw_score(name):
    t = shape(name, 40)
    truth = true_score(t, "relu", 0.3)
    rng = np.random.default_rng(6)
    for n in SIM_N:
        est, raw = [], []
        for _ in range(4):
            report = analyze(draw(t, "relu", 0.3, n, rng), bootstrap=0)
            est.append(report.agd_score)
            raw.append(report.agd_score_raw)
        assert abs(np.mean(est) - truth) < 0.6 * abs(np.mean(raw) - truth), (name, n)


# Cases where bench/bench_agd_noise.py meets the targets (coverage ≥ 0.9 and |bias| < half-width / 4) at
# σ = 0.3, size 48, with the noise shape from the per-image maps; see bench/RESULTS.md for the full table, including
# the cases that do not yet (the small Gaussian at N ≤ 64, the disk, the spike on a plateau and the stepped profile,
# which the plug-in map over-corrects).
PASSING = [("gauss_large", 8), ("gauss_aniso", 64), ("checker_gauss", 8), ("checker_gauss", 64)]


@pytest.mark.slow
@pytest.mark.parametrize("name,n", PASSING)
def test_interval_covers_the_noise_free_score(name, n):
    t = shape(name, 48)
    truth = true_score(t, "relu", 0.3)
    rng = np.random.default_rng(7)
    est, cover, half = [], [], []
    for r in range(6):
        report = analyze(draw(t, "relu", 0.3, n, rng), bootstrap=30, seed=r)
        low, high = report.interval("agd_score")
        est.append(report.agd_score)
        cover.append(low <= truth <= high)
        half.append((high - low) / 2)
    assert np.mean(cover) >= 5 / 6, (name, n, cover)
    assert abs(np.mean(est) - truth) < 0.25 * np.mean(half) + 0.002, (name, n, np.mean(est) - truth, np.mean(half))
