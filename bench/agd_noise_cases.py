"""Simulated ERF maps with a known noise-free AGD score: the cases of tests/test_agd_noise.py and
bench/bench_agd_noise.py.

Each case is a noise-free shape t (peak 1) and a per-image noise model; per-image maps are drawn i.i.d. and their
mean is analysed. The truth is the AGD score of the exact expectation E[per-image map], computed analytically:

* ``relu``: X = max(t + σZ, 0) (a ReLU'd gradient with white noise): E X = t·Φ(t/σ) + σ·φ(t/σ);
* ``white``: X = max(t + 3σ + σZ, 0) (white noise on a floor, almost never clipped): same formula with t + 3σ;
* ``heavy``: X = max(t·W + σZ, 0) with W log-normal (s.d. of log 0.75, mean 1), a heavy-tailed per-image
  gain: E X = E_W[tW·Φ(tW/σ) + σ·φ(tW/σ)] by Gauss–Hermite quadrature over log W.
"""
from __future__ import annotations

import numpy as np

from erf_tools.analysis import agd_score, fit_gaussian, gaussian_2d
from erf_tools.analysis.noise_free import expected_positive_part

SHAPES = ("gauss_small", "gauss_large", "gauss_aniso", "disk", "spike_plateau", "stepped", "checker_gauss")
NOISES = ("relu", "white", "heavy")
LOG_SD = 0.75


def shape(name: str, size: int) -> np.ndarray:
    """Noise-free shape ``name`` on a size×size grid, peak 1."""
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    u = size / 48
    shapes = {
        "gauss_small": lambda: gaussian_2d((size, size), (c, c), 3.5 * u, 3.5 * u),
        "gauss_large": lambda: gaussian_2d((size, size), (c + 1, c - 1), 9 * u, 9 * u),
        "gauss_aniso": lambda: gaussian_2d((size, size), (c - 2, c + 1), 8 * u, 3.5 * u, np.radians(35)),
        "disk": lambda: (r <= 11 * u).astype(float),
        "spike_plateau": lambda: 0.15 * (r <= 15 * u) + gaussian_2d((size, size), (c, c), 2 * u, 2 * u),
        "stepped": lambda: 1.0 * (r <= 5 * u) + 0.5 * (r <= 10 * u) + 0.25 * (r <= 15 * u),
        "checker_gauss": lambda: gaussian_2d((size, size), (c, c), 7 * u, 7 * u) * (1 + 0.5 * ((yy + xx) % 2)),
    }
    t = shapes[name]()
    return t / t.max()


def expected_map(t: np.ndarray, noise: str, sigma: float) -> np.ndarray:
    """E[per-image map] for the noise model (module docstring)."""
    if noise == "relu":
        return expected_positive_part(t, sigma)
    if noise == "white":
        return expected_positive_part(t + 3 * sigma, sigma)
    if noise == "heavy":
        nodes, weights = np.polynomial.hermite_e.hermegauss(40)
        weights = weights / weights.sum()
        gains = np.exp(LOG_SD * nodes - 0.5 * LOG_SD**2)
        return sum(w * expected_positive_part(t * g, sigma) for g, w in zip(gains, weights))
    raise ValueError(f"unknown noise {noise!r}")


def draw(t: np.ndarray, noise: str, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n per-image maps (float32, shape (n, H, W))."""
    z = rng.standard_normal((n, *t.shape))
    if noise == "relu":
        x = t + sigma * z
    elif noise == "white":
        x = t + 3 * sigma + sigma * z
    elif noise == "heavy":
        gain = np.exp(LOG_SD * rng.standard_normal((n, 1, 1)) - 0.5 * LOG_SD**2)
        x = t * gain + sigma * z
    else:
        raise ValueError(f"unknown noise {noise!r}")
    return np.maximum(x, 0.0).astype(np.float32)


def true_score(t: np.ndarray, noise: str, sigma: float) -> float:
    """AGD score of the noise-free mean map (the estimand)."""
    m = expected_map(t, noise, sigma)
    return agd_score(m, fit_gaussian(m))
