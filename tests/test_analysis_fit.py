"""Gaussian fits: full covariance with offset (synthetic truths, failure flags, subsampling accuracy) and the
Kim et al. / OpenERF-compatible fit (published maps, equivalence with the plain full-residual least squares)."""
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import least_squares

from erf_tools.analysis import fit_gaussian, fit_gaussian_kim, gaussian_2d, r_squared

MAPS = Path(__file__).parent / "fixtures" / "conformance" / "published_maps"


def published(name: str) -> np.ndarray:
    return np.load(MAPS / f"OpenERF_{name}.npy")


def angle_difference(a: float, b: float) -> float:
    """Difference of two axis orientations in degrees, modulo 180."""
    d = (a - b) % 180.0
    return min(d, 180.0 - d)


@pytest.mark.parametrize("centre,major,minor,theta_deg", [
    ((111.5, 111.5), 15.0, 15.0, 0.0),
    ((100.0, 120.0), 30.0, 10.0, 30.0),
    ((90.3, 130.7), 24.0, 8.0, 120.0),
    ((60.0, 160.0), 12.0, 4.0, 75.0),
    ((111.5, 111.5), 1.5, 1.2, 10.0),
])
def test_full_fit_recovers_synthetic_gaussians(centre, major, minor, theta_deg):
    g = gaussian_2d((224, 224), centre, major, minor, np.radians(theta_deg), amplitude=3.0)
    fit = fit_gaussian(g)
    assert fit.ok, fit.flags
    assert fit.sigma_major == pytest.approx(major, rel=0.02)
    assert fit.sigma_minor == pytest.approx(minor, rel=0.02)
    if major / minor > 1.05:
        assert angle_difference(np.degrees(fit.theta), theta_deg) < 2.0
    assert fit.centre == pytest.approx(centre, abs=0.05)
    assert fit.amplitude == pytest.approx(3.0, rel=1e-3)
    assert fit.r_squared > 0.999
    assert fit.evaluate().shape == (224, 224)


def test_full_fit_on_a_constant_floor_and_with_noise():
    rng = np.random.default_rng(3)
    g = gaussian_2d((224, 224), (105.0, 99.0), 20.0, 12.0, np.radians(40), offset=0.05)
    fit = fit_gaussian(g)
    assert fit.offset == pytest.approx(0.05, rel=1e-6)
    assert (fit.sigma_major, fit.sigma_minor) == pytest.approx((20.0, 12.0), rel=1e-6)
    noisy = g * rng.gamma(20.0, 1 / 20.0, size=g.shape)
    fit = fit_gaussian(noisy)
    assert (fit.sigma_major, fit.sigma_minor) == pytest.approx((20.0, 12.0), rel=0.02)
    assert angle_difference(np.degrees(fit.theta), 40) < 2.0
    assert fit.offset == pytest.approx(0.05, rel=0.05)
    assert 0.5 < fit.r_squared < 1.0
    assert fit.r_squared == pytest.approx(r_squared(noisy, fit.evaluate()), abs=1e-12)


def test_offset_is_non_negative_by_default():
    yy, xx = np.mgrid[:64, :64]
    disk = (np.hypot(yy - 31.5, xx - 31.5) <= 15).astype(float)
    assert fit_gaussian(disk).offset >= 0.0
    assert fit_gaussian(disk, nonnegative_offset=False).offset < 0.0  # the free fit trades a negative floor


def test_failure_flags():
    assert fit_gaussian(np.zeros((32, 32))).flags == ("empty_map",)
    assert fit_gaussian(np.full((32, 32), 2.0)).flags == ("flat_map",)
    rng = np.random.default_rng(0)
    noise = fit_gaussian(rng.random((64, 64)))
    assert not noise.ok and "low_r_squared" in noise.flags
    off = fit_gaussian(gaussian_2d((96, 96), (-30.0, 48.0), 12.0, 12.0))
    assert not off.ok and "centre_off_canvas" in off.flags
    ramp = fit_gaussian(np.tile(np.linspace(0.0, 1.0, 64), (64, 1)))
    assert not ramp.ok
    assert {"sigma_exceeds_canvas", "centre_off_canvas", "low_r_squared"} & set(ramp.flags)
    spike = np.zeros((32, 32))
    spike[16, 16] = 1.0
    assert "sigma_below_half_pixel" in fit_gaussian(spike).flags


def test_full_fit_on_1024_is_fast_and_matches_truth():
    g = gaussian_2d((1024, 1024), (500.0, 530.0), 120.0, 60.0, np.radians(-20), offset=0.02)
    fit = fit_gaussian(g)
    assert fit.block > 1  # subsampled
    assert (fit.sigma_major, fit.sigma_minor) == pytest.approx((120.0, 60.0), rel=1e-5)
    assert angle_difference(np.degrees(fit.theta), 160.0) < 0.01
    narrow = fit_gaussian(gaussian_2d((1024, 1024), (500.0, 530.0), 3.0, 2.0, 0.3))
    assert narrow.window is not None and narrow.window[1] - narrow.window[0] < 1024  # fitted in a window
    assert (narrow.sigma_major, narrow.sigma_minor) == pytest.approx((3.0, 2.0), rel=1e-4)


@pytest.mark.slow
def test_subsampled_fit_matches_full_resolution_fit_on_a_noisy_non_gaussian_1024_map():
    """Accuracy check of the block-mean fit: against the same fit on every pixel (1 px blocks)."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:1024, :1024]
    erf = (gaussian_2d((1024, 1024), (480.0, 540.0), 90.0, 50.0, np.radians(25), offset=0.01)
           + 0.3 * np.exp(-np.hypot(yy - 480.0, xx - 540.0) / 20.0))
    erf *= rng.gamma(10.0, 0.1, size=erf.shape)
    fast = fit_gaussian(erf)
    full = fit_gaussian(erf, max_fit_side=1024, refine_side=1024, restarts=False)
    assert fast.block > 1 and full.block == 1
    assert fast.sigma_major == pytest.approx(full.sigma_major, rel=0.005)
    assert fast.sigma_minor == pytest.approx(full.sigma_minor, rel=0.005)
    assert fast.centre == pytest.approx(full.centre, abs=0.5)
    assert angle_difference(np.degrees(fast.theta), np.degrees(full.theta)) < 0.5
    assert fast.r_squared == pytest.approx(full.r_squared, abs=1e-3)


# --- Kim et al. / OpenERF-compatible fit -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,sigma_x,sigma_y,r2", [
    ("resnet50.a1_in1k", 60.1, 60.5, 0.932),
    ("swin_tiny_patch4_window7_224.ms_in1k", 71.8, 72.1, 0.164),
    ("vit_small_patch16_224.augreg_in1k", 100.2, 184.5, 0.009),
])
def test_kim_fit_reproduces_published_table(name, sigma_x, sigma_y, r2):
    """agd-metrics.md §3: OpenERF axis-aligned lmfit σx / σy (R²) on the published maps."""
    fit = fit_gaussian_kim(published(name))
    assert fit.sigma_x == pytest.approx(sigma_x, abs=0.06)
    assert fit.sigma_y == pytest.approx(sigma_y, abs=0.06)
    assert fit.r_squared == pytest.approx(r2, abs=6e-4)


def test_kim_fit_flags_the_failed_vit_fit():
    fit = fit_gaussian_kim(published("vit_small_patch16_224.augreg_in1k"))
    assert not fit.ok
    assert "parameter_at_bound" in fit.flags and "low_r_squared" in fit.flags
    assert fit_gaussian_kim(published("resnet50.a1_in1k")).ok


def _kim_full_residual(image):
    """The plain formulation: every pixel a residual (the reference for the reduced 6-row formulation)."""
    p_map = image / image.sum()
    h, w = p_map.shape
    ys, xs = np.arange(h, dtype=float), np.arange(w, dtype=float)

    def fun(p):
        amp, xc, yc, sx, sy = p
        g = np.outer(np.exp(-(ys - yc) ** 2 / (2 * sy * sy)), np.exp(-(xs - xc) ** 2 / (2 * sx * sx)))
        return (amp * g / (2 * np.pi * sx * sy) - p_map).ravel()

    p0 = [2.0, 0.8 * np.median(xs), 0.8 * np.median(ys), w / 15, h / 9]
    res = least_squares(fun, p0, bounds=([0, 0, 0, 1e-6, 1e-6], [np.inf, w - 1, h - 1, np.inf, np.inf]),
                        method="trf", x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12)
    return res.x, 1 - np.var(res.fun) / np.var(p_map)


@pytest.mark.parametrize("seed", [0, 1])
def test_kim_fit_equals_full_residual_least_squares(seed):
    rng = np.random.default_rng(seed)
    image = gaussian_2d((64, 80), (30.0, 36.0), 9.0, 6.0, np.radians(25), offset=0.05)
    image = image * rng.gamma(5.0, 0.2, size=image.shape)
    params, r2 = _kim_full_residual(image)
    fit = fit_gaussian_kim(image)
    assert [fit.amplitude, fit.centre[1], fit.centre[0], fit.sigma_x, fit.sigma_y] == pytest.approx(params, rel=1e-5)
    assert fit.r_squared == pytest.approx(r2, abs=1e-9)


def test_kim_fit_uses_variance_r_squared_and_handles_empty_maps():
    # an offset Gaussian: the residual has a non-zero mean, so Var-based R² differs from 1 − SS_res/SS_tot
    image = gaussian_2d((96, 96), (48.0, 48.0), 10.0, 10.0, offset=0.2)
    fit = fit_gaussian_kim(image)
    p_map = image / image.sum()
    gx = np.exp(-(np.arange(96) - fit.centre[1]) ** 2 / (2 * fit.sigma_x**2))
    gy = np.exp(-(np.arange(96) - fit.centre[0]) ** 2 / (2 * fit.sigma_y**2))
    model = fit.amplitude * np.outer(gy, gx) / (2 * np.pi * fit.sigma_x * fit.sigma_y)
    assert fit.r_squared == pytest.approx(1 - np.var(model - p_map) / np.var(p_map), abs=1e-12)
    assert fit.r_squared != pytest.approx(r_squared(p_map, model), abs=1e-6)
    assert fit_gaussian_kim(np.zeros((16, 16))).flags == ("empty_map",)
    assert fit_gaussian_kim(np.ones((16, 16))).flags == ("flat_map",)
