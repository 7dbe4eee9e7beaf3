"""The pooled per-image noise shape (erf_tools.analysis.noise_shape) and the fit's residual noise power, against
distributions whose N-image means are known."""
from __future__ import annotations

import numpy as np
import pytest

from erf_tools.analysis import fit_gaussian, gaussian_2d
from erf_tools.analysis.gaussian_fit import gaussian_model, params_from_ellipse
from erf_tools.analysis.noise_free import expected_sqrt_positive, fit_noise_power
from erf_tools.analysis.noise_shape import (MIN_SIMULATED_IMAGES, noise_shape_from_stack, normal_noise_shape,
                                            smoothed_standard_error)

K = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 4.0])


def _truth_sqrt(draw, n, k, reps=200_000, seed=1):
    """E √max(k + Z_N, 0) by brute force for the standardised mean Z_N of n draws of ``draw``."""
    rng = np.random.default_rng(seed)
    x = draw(rng, (reps, n))
    mu, sd = draw(rng, (2_000_000,)).mean(), draw(rng, (2_000_000,)).std()
    z = (x.mean(axis=1) - mu) / (sd / np.sqrt(n))
    return np.array([np.sqrt(np.maximum(kk + z, 0.0)).mean() for kk in k])


def test_gaussian_per_image_noise_gives_the_normal_expectations():
    rng = np.random.default_rng(0)
    stack = 5.0 + rng.standard_normal((16, 48, 48))
    shape = noise_shape_from_stack(stack)
    assert shape.source == "per-image residuals" and abs(shape.skewness) < 0.05
    np.testing.assert_allclose(shape.expected_sqrt_positive(K, 1.0), expected_sqrt_positive(K, 1.0), atol=0.01)


@pytest.mark.parametrize("n", [8, 32])
def test_relu_per_image_noise_matches_the_brute_force_mean(n):
    """Per-image values max(Z, 0) (half zeros, as a ReLU'd gradient): the mean of n is right-skewed; the tables
    simulated from the pooled residuals of a flat map match the exact distribution of the mean to MC accuracy, and
    differ from the normal approximation by more than that."""
    relu = lambda rng, size: np.maximum(rng.standard_normal(size), 0.0)  # noqa: E731
    stack = relu(np.random.default_rng(2), (n, 64, 64))
    shape = noise_shape_from_stack(stack)
    truth = _truth_sqrt(relu, n, K)
    got = shape.expected_sqrt_positive(K, 1.0)
    normal = expected_sqrt_positive(K, 1.0)
    # skewness of max(Z, 0) is 1.64; residuals about the sample mean show a little less of it at small n
    assert 0.7 * 1.64 / np.sqrt(n) < shape.skewness < 1.05 * 1.64 / np.sqrt(n)
    np.testing.assert_allclose(got, truth, atol=0.012)
    assert np.max(np.abs(normal - truth)) > 2 * np.max(np.abs(got - truth))


def test_shape_varies_with_the_per_image_signal_to_noise_ratio():
    """A ReLU'd map with a bright centre: where the signal is far above the noise the per-image values are rarely
    clipped (normal-like), in the background half are 0 (skewed); the rows of the table follow the level."""
    rng = np.random.default_rng(3)
    t = 3.0 * gaussian_2d((48, 48), (23.5, 23.5), 8.0, 8.0)
    stack = np.maximum(t + rng.standard_normal((16, 48, 48)), 0.0)
    shape = noise_shape_from_stack(stack)
    assert len(shape.level_edges) == 3
    k = np.array([0.0, 0.5, 1.0])
    normal = expected_sqrt_positive(k, 1.0)
    background = shape.expected_sqrt_positive(k, 1.0, level=np.zeros(3))
    centre = shape.expected_sqrt_positive(k, 1.0, level=np.full(3, 100.0))
    assert np.max(np.abs(background - normal)) > 0.012  # skewed: max(Z, 0) in the background, 16 images
    assert np.max(np.abs(centre - normal)) < 0.006


def test_few_or_many_images_use_the_normal_shape():
    rng = np.random.default_rng(4)
    assert noise_shape_from_stack(rng.random((MIN_SIMULATED_IMAGES - 1, 16, 16))).is_normal
    assert noise_shape_from_stack(rng.random((300, 8, 8))).is_normal
    normal = normal_noise_shape(10)
    np.testing.assert_allclose(normal.expected_sqrt_positive(K, 2.0), expected_sqrt_positive(K, 2.0), rtol=1e-9)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        noise_shape_from_stack(np.zeros((4, 4)))


def test_smoothed_standard_error_keeps_a_constant_map():
    s = np.full((20, 30), 0.3)
    np.testing.assert_allclose(smoothed_standard_error(s), s)


def _jacobian(fit, shape):
    p = params_from_ellipse(fit.amplitude, fit.offset, fit.centre, fit.sigma_major, fit.sigma_minor, fit.theta)
    return gaussian_model(p, np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float), jacobian=True)[1]


def test_fit_noise_power_for_independent_and_for_gain_noise():
    """Independent pixel noise: E‖(I − H)e‖² = Σ s² (1 − k/P). A per-image gain (every pixel scaled together)
    lies in the span of the amplitude: the fit absorbs it and leaves (almost) nothing in the residual."""
    rng = np.random.default_rng(5)
    g = gaussian_2d((40, 40), (19.5, 20.5), 6.0, 4.0, 0.4, amplitude=1.0, offset=0.1)
    n = 64
    white = g + 0.2 * rng.standard_normal((n, 40, 40))
    fit = fit_gaussian(white.mean(axis=0))
    jac = _jacobian(fit, g.shape)
    residual, total = fit_noise_power(white, jac)
    expected = 0.2**2 / n * g.size
    assert residual == pytest.approx(expected * (1 - 7 / g.size), rel=0.05)
    assert total == pytest.approx(expected * (1 - 1 / g.size), rel=0.05)
    gain = g[None] * np.exp(0.5 * rng.standard_normal((n, 1, 1)))
    residual_gain, total_gain = fit_noise_power(gain, _jacobian(fit_gaussian(gain.mean(axis=0)), g.shape))
    assert residual_gain < 0.01 * total_gain
