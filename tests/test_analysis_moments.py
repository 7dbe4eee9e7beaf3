"""Map preparation and moments: validation, floors, block reduction, moment ellipse, analytic box autoconvolution."""
import numpy as np
import pytest

from erf_tools.analysis import (block_reduce, centre_of_mass, check_distribution, check_map, covariance_from_ellipse,
                                ellipse_from_covariance, estimate_floor, gaussian_2d, image_moments, normalise,
                                remove_floor)


def box_autoconvolution(n: int, k: int, margin: int = 10) -> np.ndarray:
    """n-fold convolution of a k-tap box (1-D), outer product with itself, on a canvas with a zero margin."""
    profile = np.ones(1)
    for _ in range(n):
        profile = np.convolve(profile, np.ones(k) / k)
    profile = np.pad(profile, margin)
    return np.outer(profile, profile)


@pytest.mark.parametrize("n,k", [(10, 3), (4, 5), (2, 7), (20, 3), (1, 9), (6, 4)])
def test_box_autoconvolution_moment_sigma_is_exact(n, k):
    erf = box_autoconvolution(n, k)
    expected_var = n * (k * k - 1) / 12
    mom = image_moments(erf)
    assert mom.sigma_major**2 == pytest.approx(expected_var, rel=1e-9)
    assert mom.sigma_minor**2 == pytest.approx(expected_var, rel=1e-9)
    centre = (erf.shape[0] - 1) / 2
    assert mom.centre == pytest.approx((centre, centre), abs=1e-9)
    # the floor-removed map is the same map (the border is zero), so the floor-removed moment σ is exact too
    floor = estimate_floor(erf)
    assert floor == 0.0
    assert image_moments(remove_floor(erf, floor)).sigma_major**2 == pytest.approx(expected_var, rel=1e-9)


def test_check_map_errors():
    with pytest.raises(ValueError, match="2-D"):
        check_map(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="at least 3x3"):
        check_map(np.zeros((2, 8)))
    bad = np.zeros((5, 5))
    bad[1, 2] = np.nan
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match=r"1 NaN and 1 infinite values \(first at \(y, x\) = \(1, 2\)\)"):
        check_map(bad)
    with pytest.raises(ValueError, match="numeric"):
        check_map(np.array([["a"] * 3] * 3))
    with pytest.raises(ValueError, match="negative"):
        check_distribution(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="sums to zero"):
        normalise(np.zeros((3, 3)))
    assert check_map(np.ones((3, 3), dtype=np.float32)).dtype == np.float64


def test_floor_estimates():
    g = gaussian_2d((128, 128), (64, 64), 8.0, 8.0, offset=0.25)
    assert estimate_floor(g) == pytest.approx(0.25, abs=1e-12)
    assert estimate_floor(g, method="percentile", percentile=1) == pytest.approx(0.25, abs=1e-12)
    assert estimate_floor(g, band=1) == pytest.approx(0.25, abs=1e-12)
    with pytest.raises(ValueError, match="unknown floor method"):
        estimate_floor(g, method="mode")
    positive = remove_floor(g, 0.25)
    assert positive.min() == 0.0 and positive.max() == pytest.approx(1.0)


def test_block_reduce_mean_sum_and_trimming():
    a = np.arange(7 * 5, dtype=float).reshape(7, 5)
    s = block_reduce(a, 2, how="sum")
    assert s.shape == (3, 2)
    assert s[0, 0] == a[:2, :2].sum()
    assert block_reduce(a, 2)[2, 1] == a[4:6, 2:4].mean()
    stack = np.stack([a, 2 * a])
    assert np.allclose(block_reduce(stack, 2, how="sum")[1], 2 * s)
    with pytest.raises(ValueError):
        block_reduce(a, 0)


def test_block_mean_of_gaussian_adds_box_variance():
    g = gaussian_2d((240, 240), (119.5, 119.5), 12.0, 12.0)
    f = 4
    mom = image_moments(block_reduce(g, f))
    # block pixel units -> full pixels: σ_full² = f²σ_block² − (f²−1)/12 recovers the original σ
    assert f * f * mom.sigma_major**2 - (f * f - 1) / 12 == pytest.approx(144.0, rel=1e-4)


def test_moment_ellipse_round_trip_and_orientation():
    for theta in np.radians([0, 15, 30, 89, 90, 120, 179]):
        cov = covariance_from_ellipse(9.0, 3.0, theta)
        major, minor, t = ellipse_from_covariance(cov)
        assert (major, minor) == pytest.approx((9.0, 3.0))
        assert np.degrees(t) == pytest.approx(np.degrees(theta) % 180, abs=1e-9)
    g = gaussian_2d((200, 200), (90, 110), 20.0, 6.0, np.radians(30))
    mom = image_moments(g)
    assert np.degrees(mom.theta) == pytest.approx(30, abs=0.01)
    assert mom.sigma_major == pytest.approx(20, rel=1e-3)
    assert mom.anisotropy == pytest.approx(20 / 6, rel=1e-3)
    assert centre_of_mass(g) == pytest.approx((90, 110), abs=1e-3)
