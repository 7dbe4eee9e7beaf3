"""analyze() and AGDReport: ERFResult input, bootstrap and convergence, failure policy, JSON, property tests."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from erf_tools.analysis import (AGDReport, analyze, block_reduce, bootstrap_maps, convergence_curve, gaussian_2d)
from erf_tools.results import ERFResult

ANALYSIS = Path(__file__).parent.parent / "erf_tools" / "analysis"


def make_result(maps: np.ndarray, *, downsample: int = 1, rf_centre=None, protocol="replknet") -> ERFResult:
    """An ERFResult as the engine would build it from full-resolution per-image maps."""
    mean = maps.mean(axis=0).astype(np.float64)
    per_image = block_reduce(maps, downsample, how="sum").astype(np.float32) if downsample > 1 else maps
    return ERFResult(
        map=mean, per_image_maps=per_image.astype(np.float32), per_image_downsample=downsample,
        num_images=maps.shape[0], num_rejected=0, rejected_images=[], image_ids=[str(i) for i in range(len(maps))],
        target="stages.3", feature_shape=(8, 4, 4), centre_unit=(2, 2), receptive_field_centre=rf_centre,
        total_stride=(32.0, 32.0), input_size=maps.shape[1:], model="synthetic", protocol=protocol, options={},
        weights={}, image_source={}, preprocessing={})


def noisy_gaussians(n=12, size=96, seed=0, sigma=(14.0, 9.0)):
    rng = np.random.default_rng(seed)
    g = gaussian_2d((size, size), (size / 2 - 2, size / 2 + 3), sigma[0], sigma[1], np.radians(35), offset=0.01)
    return np.stack([g * rng.gamma(4.0, 0.25, size=g.shape) for _ in range(n)])


def test_analyze_result_with_bootstrap_and_convergence():
    maps = noisy_gaussians()
    result = make_result(maps, downsample=2, rf_centre=(48.0, 48.0))
    report = analyze(result, bootstrap=60, seed=1)
    assert isinstance(report, AGDReport)
    assert report.num_images == 12 and report.protocol == "replknet"
    assert report.fit.ok and report.agd_score > 0.9
    assert report.spread["sigma_major"] == pytest.approx(14.0, rel=0.03)
    assert report.spread["sigma_minor"] == pytest.approx(9.0, rel=0.03)
    assert report.receptive_field_centre == (48.0, 48.0)
    assert "receptive_field_centre" in report.spread["radial_mass"]
    for name in ("agd_score", "sigma_major", "sigma_minor", "r_squared", "beta2", "r(0.2)", "r(0.5)", "r(0.99)"):
        low, high = report.interval(name)
        assert np.isfinite(low) and np.isfinite(high) and low <= high, name
    low, high = report.interval("sigma_major")
    assert low < 14.0 * 1.03 and high > 14.0 * 0.97
    estimates = {"agd_score": report.agd_score, "sigma_major": report.spread["sigma_major"],
                 "sigma_minor": report.spread["sigma_minor"], "r_squared": report.r_squared,
                 "beta2": report.shape["mardia_kurtosis"]}
    for name, value in estimates.items():  # an estimate outside its interval is always flagged
        low, high = report.interval(name)
        assert (f"noise_biased:{name}" in report.flags) == (not low <= value <= high), name
    assert report.bootstrap.n_resamples == 60 and report.bootstrap.num_images == 12
    assert report.convergence is not None
    assert report.convergence.num_images[0] == 1 and report.convergence.num_images[-1] == 12
    assert report.convergence.distance[-1] == pytest.approx(0.0, abs=1e-12)
    assert report.convergence.distance[0] > report.convergence.distance[-2]
    # seeded: the same call gives the same intervals
    again = analyze(result, bootstrap=60, seed=1)
    assert again.confidence_intervals == report.confidence_intervals
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert "confidence_intervals" in text
    assert "AGD score" in report.summary()


def test_bootstrap_interval_widths_shrink_with_more_images():
    few = analyze(make_result(noisy_gaussians(n=4, seed=2)), bootstrap=40)
    many = analyze(make_result(noisy_gaussians(n=32, seed=2)), bootstrap=40)
    width = lambda r: np.subtract(*r.interval("sigma_major")[::-1])  # noqa: E731
    assert width(many) < width(few)


def test_bare_map_and_stack_inputs():
    maps = noisy_gaussians(n=6)
    bare = analyze(maps.mean(axis=0))
    assert bare.bootstrap is None and bare.convergence is None and "no_per_image_maps" not in bare.flags
    stacked = analyze(maps, bootstrap=20)
    assert stacked.num_images == 6 and stacked.bootstrap is not None
    given_stack = analyze(maps.mean(axis=0), per_image_maps=maps, bootstrap=20)
    for name, interval in stacked.confidence_intervals.items():
        assert given_stack.interval(name) == pytest.approx(interval, nan_ok=True)
    no_stack = make_result(maps)
    no_stack.per_image_maps = None
    assert "no_per_image_maps" in analyze(no_stack).flags
    assert "bootstrap_needs_two_images" in analyze(maps[:1], bootstrap=10).flags


def test_input_size_scales_pixels():
    g = gaussian_2d((112, 112), (55.5, 55.5), 10.0, 10.0)
    report = analyze(g, input_size=(224, 224), bootstrap=0)
    assert report.pixel_scale == 2.0
    assert report.spread["sigma_major"] == pytest.approx(20.0, rel=1e-3)
    assert report.spread["sigma_fraction"] == pytest.approx(20.0 / 224, rel=1e-3)


def test_empty_map_is_a_flagged_report():
    report = analyze(np.zeros((32, 32)))
    assert "empty_map" in report.flags and "not_gaussian" in report.flags
    assert np.isnan(report.agd_score) and not report.ok
    assert all(a.side is None for a in report.area_ratios)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["agd_score"] is None
    report.summary()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_maps_raise_a_clear_error(bad):
    image = gaussian_2d((32, 32), (16, 16), 4.0, 4.0)
    image[3, 5] = bad
    with pytest.raises(ValueError, match=r"(NaN|infinite).*\(3, 5\)"):
        analyze(image)


def test_non_finite_per_image_maps_raise():
    maps = noisy_gaussians(n=3, size=32)
    maps[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"images \[1\]"):
        analyze(np.ones((32, 32)), per_image_maps=maps)


def test_negative_values_are_clipped_and_flagged():
    image = gaussian_2d((48, 48), (24, 24), 5.0, 5.0) - 0.01
    report = analyze(image)
    assert "negative_values_clipped" in report.flags
    assert report.agd_score > 0.9


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="at least 3x3"):
        analyze(np.ones((2, 2)))
    with pytest.raises(ValueError, match="2-D"):
        analyze(np.ones((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="input_size"):
        analyze(np.ones((8, 8)), input_size=(0, 8))


def test_bootstrap_and_convergence_functions():
    maps = np.stack([np.full((4, 4), v) for v in (1.0, 2.0, 3.0, 6.0)])
    res = bootstrap_maps(maps, lambda m: {"mean": float(m.mean())}, n_resamples=200, seed=0)
    assert res.estimate["mean"] == 3.0
    low, high = res.intervals["mean"]
    assert 1.0 <= low < 3.0 < high <= 6.0
    basic = bootstrap_maps(maps, lambda m: {"mean": float(m.mean())}, n_resamples=200, seed=0, method="basic")
    assert basic.intervals["mean"] == pytest.approx((6.0 - high, 6.0 - low))
    with pytest.raises(ValueError, match="method"):
        bootstrap_maps(maps, lambda m: {}, method="bca")
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        bootstrap_maps(maps[0], lambda m: {})
    identical = convergence_curve(np.stack([np.ones((5, 5))] * 6))
    assert identical.converged_at == 1 and np.allclose(identical.distance, 0)
    noisy = convergence_curve(noisy_gaussians(n=20, size=32), tolerance=0.01)
    assert noisy.images_needed > 1 and np.all(np.diff(noisy.num_images) > 0)


@pytest.mark.parametrize("module", ["maps", "moments", "gaussian_fit", "shape", "area", "checkerboard", "uncertainty",
                                    "noise", "noise_free"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"erf_tools.analysis.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_analysis_never_imports_torch_or_the_models():
    forbidden = {"torch", "timm", "torchvision", "erf_tools.models", "erf_tools.extract", "erf_tools.targets"}
    for path in ANALYSIS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (path.name, name)


# --- property tests ---------------------------------------------------------------------------------------------------

maps_strategy = st.integers(3, 24).flatmap(lambda h: st.integers(3, 24).flatmap(
    lambda w: arrays(np.float64, (h, w), elements=st.one_of(
        st.just(0.0), st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
        st.floats(1e-300, 1e-3, allow_nan=False, allow_infinity=False)))))


def _finite_or_none(value):
    return value is None or (isinstance(value, (int, float)) and np.isfinite(value))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps_strategy)
def test_random_non_negative_maps_never_crash(image):
    report = analyze(image, bootstrap=0)
    assert isinstance(report.flags, tuple) and all(isinstance(f, str) for f in report.flags)
    assert np.isnan(report.agd_score) or 0.0 <= report.agd_score <= 2.0  # above 1: Gaussian within the noise
    assert np.isnan(report.agd_score_raw) or 0.0 <= report.agd_score_raw <= 1.0
    if np.isnan(report.agd_score):
        assert report.flags  # a missing score is always explained
    data = report.to_dict()
    json.dumps(data, allow_nan=False)  # every number finite or None
    for a in data["area_ratios"]:
        assert a["reachable"] == (a["side"] is not None)
    for key in ("sigma_major", "sigma_minor"):
        assert _finite_or_none(data["spread"][key])
    if data["spread"]["sigma_major"] is not None:
        assert report.fit.ok


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 5).flatmap(lambda n: arrays(np.float64, (n, 8, 8),
                                                  elements=st.floats(0.0, 100.0, allow_nan=False))))
def test_random_stacks_bootstrap_never_crashes(stack):
    report = analyze(stack, bootstrap=8, seed=0)
    json.dumps(report.to_dict(), allow_nan=False)
    for low, high in report.confidence_intervals.values():
        assert (np.isnan(low) and np.isnan(high)) or low <= high
