"""Areas and radii: RepLKNet r(t) against the official vectors and protocol fixture, OpenERF's metrics, rank area,
effective area, mass radius; checkerboard indices."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from erf_tools.analysis import (area_ratio, centre_of_mass, checkerboard_indices, effective_area, gaussian_2d,
                                mass_radius, radial_cumulative_mass, rank_area)

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
VECTORS = json.loads((FIXTURES / "erf" / "area_ratio_vectors.json").read_text())


def vector_map(case: str) -> np.ndarray:
    """The synthetic 1024×1024 maps of erf/area_ratio_vectors.json, built as its 'map' fields describe."""
    size = 1024
    if case == "uniform":
        return np.ones((size, size))
    if case.startswith("gauss_"):
        amplitude, sigma = {"gauss_A100_sigma64": (100, 64), "gauss_A1_sigma64": (1, 64),
                            "gauss_A100_sigma200": (100, 200)}[case]
        y = np.arange(size)[:, None] - 512.0
        x = np.arange(size)[None, :] - 512.0
        return amplitude * np.exp(-(y * y + x * x) / (2.0 * sigma * sigma))
    if case == "uniform_hot_top_row":
        m = np.ones((size, size))
        m[0, :] = 1000
        return m
    if case == "border_only":
        m = np.zeros((size, size))
        m[0, :] = 1
        m[:, 0] = 1
        return m
    raise KeyError(case)


@pytest.mark.parametrize("case", [c["case"] for c in VECTORS["cases"]])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_area_ratio_reproduces_official_vectors(case, dtype):
    expected = next(c for c in VECTORS["cases"] if c["case"] == case)["results"]
    got = area_ratio(vector_map(case).astype(dtype), [r["thresh"] for r in expected])
    for ours, ref in zip(got, expected):
        assert ours.side == ref["side"]
        if ref["side"] is None:
            assert ours.ratio is None and not ours.reachable and ours.percent is None
        else:
            assert ours.ratio == pytest.approx(ref["area_ratio"], abs=1e-12)
            assert ours.fraction == pytest.approx(ref["fraction_at_side"], abs=1e-6)


def test_area_ratio_reproduces_replknet_protocol_rectangles():
    meta = json.loads((FIXTURES / "erf" / "replknet_protocol.json").read_text())
    tensors = load_file(FIXTURES / "erf" / "replknet_protocol.safetensors")
    expected = meta["results"]["rectangles"]
    thresholds = [r["thresh"] for r in expected]
    from_mean = area_ratio(tensors["mean_map"], thresholds)  # log10(x+1)/max applied here
    from_normalised = area_ratio(tensors["normalized_map"], thresholds, transform="none")
    for ref, a, b in zip(expected, from_mean, from_normalised):
        assert a.side == b.side == ref["side"]
        assert a.ratio == pytest.approx(ref["area_ratio"], abs=1e-12)
        assert a.fraction == pytest.approx(ref["fraction_at_side"], abs=1e-6)


def test_area_ratio_options():
    g = gaussian_2d((128, 128), (60.0, 70.0), 8.0, 8.0)
    centred = area_ratio(g, (0.5,), centre=(60, 70), transform="none")[0]
    default = area_ratio(g, (0.5,), transform="none")[0]
    assert centred.side < default.side and centred.centre == (60, 70)
    assert area_ratio(g, (0.5,), centre=(59.5, 69.5))[0].centre == (60, 70)  # halves round up
    continuous = area_ratio(g, (0.5,), centre=(60, 70), transform="none", interpolate=True)[0]
    assert centred.side - 2 <= continuous.side <= centred.side
    assert area_ratio(np.zeros((16, 16)), (0.5,))[0].side is None
    assert area_ratio(g, (0.5,), centre=(0, 0))[0].side is None  # no square fits about a corner
    with pytest.raises(ValueError, match="thresholds"):
        area_ratio(g, (0.0,))
    with pytest.raises(ValueError, match="transform"):
        area_ratio(g, (0.5,), transform="sqrt")


def test_openerf_metrics_of_the_kim2023_fixture():
    meta = json.loads((FIXTURES / "erf" / "kim2023_protocol.json").read_text())
    tensors = load_file(FIXTURES / "erf" / "kim2023_protocol.safetensors")
    accumulated = tensors["accumulated_map"].astype(np.float64)
    erf = accumulated / accumulated.sum()  # openerf's float64 map (the stored erf_map is its float32 cast)
    ref = meta["openerf_metrics"]
    assert centre_of_mass(erf) == pytest.approx((ref["com_y"], ref["com_x"]), abs=1e-9)
    assert list(np.unravel_index(np.argmax(erf), erf.shape)) == ref["argmax_yx"]
    masses = radial_cumulative_mass(erf)
    for radius, value in ref["radial_cumulative_mass"].items():
        assert masses[int(radius)] == pytest.approx(value, abs=1e-12)


def test_openerf_metrics_of_the_published_resnet50_map():
    erf = np.load(FIXTURES / "published_maps" / "OpenERF_resnet50.a1_in1k.npy")
    ref = json.loads((FIXTURES / "published_maps" / "OpenERF_resnet50.a1_in1k_metrics.json").read_text())
    assert centre_of_mass(erf) == pytest.approx((ref["com_y"], ref["com_x"]), abs=1e-9)
    assert list(np.unravel_index(np.argmax(erf), erf.shape)) == ref["argmax_yx"]
    masses = radial_cumulative_mass(erf, (112, 112))
    for radius, value in ref["radial_cumulative_mass"].items():
        assert masses[int(radius)] == pytest.approx(value, abs=1e-12)


def test_rank_area_and_effective_area():
    assert rank_area(np.ones((10, 10)), (0.5, 1.0)) == (0.5, 1.0)
    spike = np.zeros((10, 10))
    spike[3, 4] = 5.0
    assert rank_area(spike, (0.99,)) == (0.01,)
    assert np.isnan(rank_area(np.zeros((5, 5)))[0])
    assert effective_area(np.ones((7, 9))).area == pytest.approx(63)
    assert effective_area(np.ones((7, 9))).ratio == pytest.approx(1.0)
    g = gaussian_2d((256, 256), (127.5, 127.5), 12.0, 6.0, 0.3)
    eff = effective_area(g)
    assert eff.area == pytest.approx(2 * np.pi * np.e * 12 * 6, rel=0.01)
    assert eff.sigma == pytest.approx(np.sqrt(72), rel=0.01)


def test_mass_radius_matches_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(20):
        h, w = rng.integers(3, 40, size=2)
        image = rng.random((h, w)) * (rng.random((h, w)) < 0.4)
        if image.sum() == 0:
            continue
        centre = (rng.uniform(-3, h + 3), rng.uniform(-3, w + 3))
        dist = np.hypot(np.arange(h)[:, None] - centre[0], np.arange(w)[None, :] - centre[1])
        for t, r in zip((0.2, 0.5, 1.0), mass_radius(image, centre, (0.2, 0.5, 1.0))):
            assert image[dist <= r + 1e-9].sum() >= t * image.sum() * (1 - 1e-9)
            assert image[dist < r - 1e-9].sum() < t * image.sum() * (1 - 1e-12)


def test_checkerboard_indices():
    assert checkerboard_indices(np.ones((5, 6))) == (0.0, 0.0)
    board = (np.indices((6, 6)).sum(axis=0) % 2).astype(float)
    assert checkerboard_indices(board) == (1.0, 2.0)
    ramp = np.tile(np.arange(5.0), (5, 1))
    l1, l2 = checkerboard_indices(ramp, normalise="none")
    assert l1 == pytest.approx(20 / 40) and l2 == 0.0
    assert np.isnan(checkerboard_indices(np.zeros((4, 4)))[0])
    with pytest.raises(ValueError, match="normalise"):
        checkerboard_indices(board, normalise="l2")
