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
from erf_tools.analysis.noise import estimate_map_noise, gain_adjusted_stack, gain_adjusted_standard_error
from erf_tools.analysis.noise_free import (expected_positive_part, expected_sqrt_positive, noise_free_agd,
                                           noise_free_r_squared, radial_residual, score_from_hellinger_squared)
from erf_tools.analysis.uncertainty import bootstrap_maps
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


# --- the estimator's parts --------------------------------------------------------------------------------------
def test_signed_root_is_odd_and_the_raw_mapping_clips():
    assert score_from_hellinger_squared(0.04, signed=True) == pytest.approx(0.8)
    assert score_from_hellinger_squared(-0.04, signed=True) == pytest.approx(1.2)
    assert score_from_hellinger_squared(-3.0, signed=True) == 2.0 and score_from_hellinger_squared(3.0) == 0.0
    assert score_from_hellinger_squared(-0.04) == 1.0 and np.isnan(score_from_hellinger_squared(float("nan")))


def test_a_perfect_gaussian_under_noise_scores_about_one_on_both_sides():
    """White noise on a floor around an exact Gaussian: the estimates scatter about 1, above it too; their mean is
    within a quarter of the mean interval half-width of 1 (clipped at 1 it was biased low by about 0.6 of it)."""
    t = gaussian_2d((40, 40), (19.5, 19.5), 6.0, 6.0)
    rng = np.random.default_rng(11)
    scores, half = [], []
    for r in range(6):
        stack = np.maximum(t + 1.0 + 0.3 * rng.standard_normal((16, 40, 40)), 0.0)
        report = analyze(stack, bootstrap=20, seed=r)
        low, high = report.interval("agd_score")
        scores.append(report.agd_score)
        half.append((high - low) / 2)
        assert low <= 1.0 <= high and high > 1.0
    assert max(scores) > 1.0
    assert abs(np.mean(scores) - 1.0) < 0.25 * np.mean(half)


def test_gain_adjusted_stack_removes_per_image_gain_and_level():
    rng = np.random.default_rng(12)
    g = gaussian_2d((24, 24), (11.5, 11.5), 4.0, 4.0)
    gains, levels = np.exp(0.75 * rng.standard_normal(10)), 0.2 * rng.random(10)
    stack = gains[:, None, None] * g + levels[:, None, None]
    adjusted = gain_adjusted_stack(stack)
    np.testing.assert_allclose(adjusted.mean(axis=0), stack.mean(axis=0), atol=1e-12)
    assert adjusted.std(axis=0).max() < 1e-12 < stack.std(axis=0).max()  # only gain and level: no shape noise
    noisy = stack + 0.05 * rng.standard_normal(stack.shape)
    residual = gain_adjusted_stack(noisy).std(axis=0, ddof=1)
    assert np.median(residual) == pytest.approx(0.05, rel=0.2)  # the pixel noise is kept
    # the engine's exact second moments are scaled block by block by the same ratio
    scaled = gain_adjusted_standard_error(noisy.std(axis=0, ddof=1) / np.sqrt(10), noisy, gain_adjusted_stack(noisy))
    np.testing.assert_allclose(scaled, residual / np.sqrt(10), rtol=1e-10)


def test_a_per_image_gain_does_not_move_the_score():
    """Per-image maps that differ only by a log-normal gain and ReLU'd white noise: the score estimate equals the one
    of the same maps without the gain within their noise (the gain used to be corrected as if it were pixel noise)."""
    t = shape("gauss_large", 40)
    rng = np.random.default_rng(13)
    z = 0.3 * rng.standard_normal((32, 40, 40))
    gain = np.exp(0.75 * rng.standard_normal((32, 1, 1)) - 0.5 * 0.75**2)
    plain, scaled = analyze(np.maximum(t + z, 0), bootstrap=0), analyze(np.maximum(t * gain + z, 0), bootstrap=0)
    assert scaled.noise["reliability"]["gain_adjusted"]
    assert scaled.agd_score == pytest.approx(plain.agd_score, abs=0.03)


def test_radial_residual_keeps_a_sharp_rim_and_drops_noise_rings():
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 31.5, xx - 31.5)
    rim = (r <= 12).astype(float) * 0.2
    rng = np.random.default_rng(14)
    se = np.full((64, 64), 0.1)
    profile = radial_residual(rim + se * rng.standard_normal(rim.shape), se, (31.5, 31.5), 25.0 * np.eye(2))
    inside, outside = (r < 11), (r > 13) & (r < 30)
    assert abs(profile[inside].mean() - 0.2) < 0.02 and np.abs(profile[outside]).max() < 0.06
    assert (profile[outside] == 0).mean() > 0.9  # rings of pure noise contribute nothing
    assert np.abs(profile[(r > 12.3) & (r < 13)]).max() < 0.06  # no blur across the rim
    noise_only = radial_residual(se * rng.standard_normal(rim.shape), se, (31.5, 31.5), 25.0 * np.eye(2))
    assert (noise_only == 0).mean() > 0.9


def test_multiscale_profile_keeps_a_rim_and_a_small_wide_background_shift():
    # a rim of 0.2 inside r = 12 and a background 0.02 below the offset beyond it: 0.1 s.e. per pixel, so a single
    # 0.5 px ring (~40 pixels, s.e. 0.016) rarely sees the shift, a 16 px ring (~1500 pixels, s.e. 0.0026) does
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 31.5, xx - 31.5)
    truth = np.where(r <= 12, 0.2, -0.02)
    rng = np.random.default_rng(16)
    se = np.full((64, 64), 0.1)
    noisy = truth + se * rng.standard_normal(truth.shape)
    multi = radial_residual(noisy, se, (31.5, 31.5), 25.0 * np.eye(2), multiscale=True)
    outside, inside = (r > 14) & (r < 30), r < 11
    assert abs(multi[inside].mean() - 0.2) < 0.02
    assert np.abs(multi[(r > 12.3) & (r < 13)] - 0.2).min() > 0.15  # no blur across the rim
    assert abs(multi[outside].mean() + 0.02) < 0.006  # 2.3 s.e. of the wide ring
    assert np.median(np.abs(multi[outside] + 0.02)) < 0.005  # most rings see it (a single ring's s.e. is 0.016)
    noise_only = radial_residual(se * rng.standard_normal(r.shape), se, (31.5, 31.5), 25.0 * np.eye(2),
                                 multiscale=True)
    assert np.abs(noise_only).mean() < 0.01  # a few false rings (more tests than with one width), each small


def test_bootstrap_error_maps_give_the_resamples_standard_error():
    rng = np.random.default_rng(15)
    maps = rng.random((12, 6, 6))
    seen = []

    def statistic(mean, se):
        seen.append(se.mean())
        return {"m": float(mean.mean())}

    bootstrap_maps(maps, statistic, n_resamples=3, with_standard_error=True, error_maps=np.zeros_like(maps))
    assert seen == [0.0] * 4
    with pytest.raises(ValueError, match="error_maps"):
        bootstrap_maps(maps, statistic, n_resamples=1, with_standard_error=True, error_maps=maps[:3])


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


# Cases where bench/bench_agd_noise.py meets the targets (coverage ≥ 0.9 and |bias| < half-width / 4) with a
# margin (|bias| ≤ 0.12 half-widths, coverage 1.00 over 16 bootstrapped repetitions) at σ = 0.3, size 48: one or
# two per shape and noise model, among them former failures (the small Gaussians, Gaussians under a heavy-tailed
# per-image gain and the disk, fixed in the third round; the stepped profile and the disk at 64 images, fixed by the
# residual bootstrap's correction). bench/RESULTS.md ("fifth round") has the full 84-case
# table, including the 23 cases that still miss (ReLU'd Gaussians over-corrected at 256 images, the stepped profile
# and the spike on a plateau under white noise from 64 images, coverage of the steps and spike at 256).
PASSING = [("gauss_small", "white", 64), ("gauss_small", "heavy", 64), ("gauss_large", "relu", 8),
           ("gauss_large", "white", 64), ("gauss_aniso", "relu", 16), ("gauss_aniso", "heavy", 64),
           ("disk", "white", 64), ("disk", "heavy", 64), ("spike_plateau", "relu", 64), ("stepped", "relu", 64),
           ("checker_gauss", "white", 64), ("checker_gauss", "heavy", 64)]


def test_bias_correction_needs_the_bootstrap_and_16_images():
    """The residual bootstrap's correction (docs/scoring.md, 2c) is what separates agd_score from the plug-in stage:
    applied with a bootstrap from 32 images, reported, and absent otherwise."""
    stack = draw(shape("stepped", 40), "relu", 0.3, 32, np.random.default_rng(3))
    plain, boot = analyze(stack, bootstrap=0), analyze(stack, bootstrap=20, seed=0)
    assert not plain.bias_correction["applied"] and plain.bias_correction["reason"] == "no bootstrap"
    assert boot.noise_free.score == plain.agd_score  # the plug-in stage does not depend on the bootstrap
    c = boot.bias_correction
    assert c["applied"] and c["num_images"] == 32 and np.isfinite(c["hellinger_squared_world"])
    assert c["hellinger_squared"] == pytest.approx(c["hellinger_squared_plug_in"] - c["hellinger_squared_bias"])
    assert boot.agd_score == score_from_hellinger_squared(c["hellinger_squared"], signed=True)
    assert boot.shape["agd_score"] == boot.agd_score and "bias-corrected" in boot.summary()
    low, high = boot.interval("agd_score")
    assert low <= boot.agd_score <= high
    few = analyze(stack[:8], bootstrap=20, seed=0)
    assert not few.bias_correction["applied"] and few.bias_correction["reason"] == "fewer than 32 images"
    assert few.agd_score == few.noise_free.score


@pytest.mark.slow
@pytest.mark.parametrize("name,noise,n", PASSING)
def test_interval_covers_the_noise_free_score(name, noise, n):
    """Coverage ≥ 5/6 and a mean bias within a quarter of the mean half-width, up to 2 standard errors of the mean
    of 6 repetitions (the target is on the true bias; 6 draws estimate it to ± 2 s.e.)."""
    t = shape(name, 48)
    truth = true_score(t, noise, 0.3)
    rng = np.random.default_rng(7)
    est, cover, half = [], [], []
    for r in range(6):
        report = analyze(draw(t, noise, 0.3, n, rng), bootstrap=30, seed=r)
        low, high = report.interval("agd_score")
        est.append(report.agd_score)
        cover.append(low <= truth <= high)
        half.append((high - low) / 2)
    assert np.mean(cover) >= 5 / 6, (name, noise, n, cover)
    bias, standard_error = np.mean(est) - truth, np.std(est, ddof=1) / np.sqrt(len(est))
    assert abs(bias) < 0.25 * np.mean(half) + 2 * standard_error, (name, noise, n, bias, np.mean(half))
