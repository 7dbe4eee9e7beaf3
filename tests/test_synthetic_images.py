"""Issue 17: the dead-leaves image generator and the independent-source accounting of image sources."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from erf_tools import synthetic_images
from erf_tools.extension_build import BuildState
from erf_tools.images import ImageSourceError, iter_inputs, open_image_source, preprocessing_for
from erf_tools.synthetic_images import (
    STAMP_RADIUS,
    CompiledPainterUnavailable,
    DeadLeavesModel,
    SyntheticImageError,
    dead_leaves_labels,
    compiled_painter_available,
    expected_edge_density,
    generator_backend,
    image_rng,
    leaf_colours,
    luminance,
    mean_disc_area,
    occlusion_edge_density,
    radial_power_spectrum,
    sample_radii,
    spectrum_slope,
    synthetic_image,
)


@pytest.fixture(scope="module")
def images_128():
    """Eight 128×128 images of seed 0 with their leaf labels (shared by the statistics tests)."""
    model = DeadLeavesModel()
    images = [synthetic_image(0, i, 128, 128) for i in range(8)]
    labels = [dead_leaves_labels(image_rng(0, i), 128, 128, model)[0] for i in range(8)]
    return images, labels


# ------------------------------------------------------------------------------------------------ determinism, shapes
def test_image_depends_only_on_seed_and_index():
    first = synthetic_image(3, 5, 40, 56)
    again = synthetic_image(3, 5, 40, 56)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, synthetic_image(3, 6, 40, 56))
    assert not np.array_equal(first, synthetic_image(4, 5, 40, 56))


def test_source_images_independent_of_count_and_order():
    source_3 = open_image_source("synthetic:48", num_images=3, seed=2)
    source_9 = open_image_source("synthetic:48", num_images=9, seed=2)
    np.testing.assert_array_equal(np.asarray(source_3.load(2)), np.asarray(source_9.load(2)))
    backwards = [np.asarray(source_9.load(i)) for i in (8, 4, 2)]
    forwards = [np.asarray(source_9.load(i)) for i in (2, 4, 8)]
    for a, b in zip(backwards, forwards[::-1]):
        np.testing.assert_array_equal(a, b)
    # A resumed stream (start=2) yields the same tensors as the tail of a full one.
    preprocess = preprocessing_for("replknet", None, 48)
    full = list(iter_inputs(source_9, preprocess, num_images=5))
    tail = list(iter_inputs(source_9, preprocess, num_images=5, start=2))
    assert [i for i, _ in tail] == [i for i, _ in full[2:]]
    for (_, a), (_, b) in zip(tail, full[2:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("height,width", [(1, 1), (7, 300), (33, 17), (64, 64)])
def test_any_size_rgb_uint8(height, width):
    image = synthetic_image(0, 0, height, width)
    assert image.shape == (height, width, 3) and image.dtype == np.uint8


needs_compiled = pytest.mark.skipif(not compiled_painter_available(),
                                    reason="the compiled dead-leaves painter cannot be built here")


@pytest.mark.parametrize("backend", ["reference", pytest.param("compiled", marks=needs_compiled)])
def test_labels_match_a_naive_painter(backend):
    """Front-to-back drawing with culling (scatter-min in NumPy, first writer in C++) equals painting every leaf
    back to front."""
    model = DeadLeavesModel(r_max_fraction=0.4)
    for index, (height, width) in enumerate([(37, 53), (80, 41), (20, 90)]):
        with generator_backend.use(backend):
            labels, leaves = dead_leaves_labels(image_rng(7, index), height, width, model)
        reference = np.full((height, width), -1)
        ys, xs = np.mgrid[0:height, 0:width]
        for i in range(len(leaves.radius) - 1, -1, -1):
            r = leaves.radius[i]
            # Small leaves are stamped about the nearest pixel centre (the documented rasterisation).
            cy, cx = (np.rint(leaves.centre_y[i]), np.rint(leaves.centre_x[i])) if r <= STAMP_RADIUS else \
                (leaves.centre_y[i], leaves.centre_x[i])
            reference[(ys - cy) ** 2 + (xs - cx) ** 2 <= r * r] = i
        np.testing.assert_array_equal(labels, reference)
        assert (labels < 0).mean() < model.max_uncovered


# ---------------------------------------------------------------------------------------------- the compiled painter
CUSTOM_MODEL = DeadLeavesModel(exponent=2.5, r_min=0.7, r_max_fraction=1.5, shading=0.6, max_uncovered=0.05)


def both_backends(seed, index, height, width, model=None):
    with generator_backend.use("reference"):
        reference = synthetic_image(seed, index, height, width, model)
    with generator_backend.use("compiled"):
        compiled = synthetic_image(seed, index, height, width, model)
    return reference, compiled


@needs_compiled
@pytest.mark.parametrize("seed,index,height,width,model", [
    (0, 0, 64, 64, None),
    (1, 4, 37, 130, None),      # non-square, wide
    (2, 1, 151, 23, None),      # non-square, tall
    (3, 0, 1, 1, None),         # tiny: one pixel
    (3, 2, 2, 3, None),
    (4, 7, 9, 5, CUSTOM_MODEL),  # leaves larger than the image (r_max = 1.5 × the short side)
    (5, 3, 60, 90, CUSTOM_MODEL),
    (6, 5, 200, 160, None),      # r_max 80 px: leaves drawn on their box (r > STAMP_RADIUS) as well as stamped
    (7, 1, 96, 96, DeadLeavesModel(shading=0.0, r_min=3.0, max_uncovered=0.2)),
])
def test_compiled_painter_matches_numpy_bit_for_bit(seed, index, height, width, model):
    reference, compiled = both_backends(seed, index, height, width, model)
    assert compiled.dtype == np.uint8 and compiled.shape == (height, width, 3)
    np.testing.assert_array_equal(compiled, reference)


@needs_compiled
def test_compiled_labels_and_leaves_match_numpy():
    """The leaf count (the stopping rule), the draws and the front-most leaf of every pixel, background included."""
    model = DeadLeavesModel(max_uncovered=0.3)  # stops early: many background pixels
    for index, (height, width) in enumerate([(48, 70), (130, 33)]):
        results = []
        for backend in ("reference", "compiled"):
            with generator_backend.use(backend):
                results.append(dead_leaves_labels(image_rng(11, index), height, width, model))
        (ref_labels, ref_leaves), (labels, leaves) = results
        np.testing.assert_array_equal(labels, ref_labels)
        assert (labels < 0).any()
        for field in ("centre_y", "centre_x", "radius"):
            np.testing.assert_array_equal(getattr(leaves, field), getattr(ref_leaves, field))


@needs_compiled
def test_generator_backend_switch(monkeypatch):
    monkeypatch.setenv(synthetic_images.ENV_VAR, "reference")
    assert generator_backend.get() == "reference"
    calls = []
    original = synthetic_images.EXTENSION.load
    monkeypatch.setattr(synthetic_images.EXTENSION, "load", lambda: calls.append(1) or original())
    reference = synthetic_image(0, 2, 30, 40)
    assert calls == []
    with generator_backend.use("compiled"):
        assert generator_backend.get() == "compiled"
        compiled = synthetic_image(0, 2, 30, 40)
    assert calls and generator_backend.get() == "reference"
    np.testing.assert_array_equal(compiled, reference)
    previous = generator_backend.set("compiled")
    try:
        assert previous is None and generator_backend.get() == "compiled"
    finally:
        generator_backend.set(previous)
    monkeypatch.setenv(synthetic_images.ENV_VAR, " Auto ")
    assert generator_backend.get() == "auto"
    monkeypatch.setenv(synthetic_images.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        generator_backend.get()
    with pytest.raises(ValueError, match="backend must be one of"):
        generator_backend.set("fused")


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    """A missing compiler: auto warns once and uses NumPy; forcing "compiled" is a clear error."""
    monkeypatch.setattr(synthetic_images.EXTENSION, "state", BuildState(error="CalledProcessError: no compiler"))
    monkeypatch.delenv(synthetic_images.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = synthetic_image(1, 0, 24, 31)
        second = synthetic_image(1, 1, 24, 31)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no compiler" in messages[0] and synthetic_images.ENV_VAR in messages[0]
    with generator_backend.use("reference"):
        np.testing.assert_array_equal(first, synthetic_image(1, 0, 24, 31))
        np.testing.assert_array_equal(second, synthetic_image(1, 1, 24, 31))
    with generator_backend.use("compiled"), pytest.raises(CompiledPainterUnavailable, match="no compiler"):
        synthetic_image(1, 0, 24, 31)


def test_bad_parameters_are_named():
    with pytest.raises(SyntheticImageError, match="exponent"):
        DeadLeavesModel(exponent=1.0)
    with pytest.raises(SyntheticImageError, match="r_min"):
        DeadLeavesModel(r_min=0.1)
    with pytest.raises(SyntheticImageError, match="colour_cov"):
        DeadLeavesModel(colour_cov=((1, 0, 0), (0, -1, 0), (0, 0, 1)))
    with pytest.raises(SyntheticImageError, match="size"):
        synthetic_image(0, 0, 0, 10)
    with pytest.raises(SyntheticImageError, match="non-negative"):
        synthetic_image(-1, 0, 10, 10)
    with pytest.raises(ImageSourceError, match="synthetic image option"):
        open_image_source("synthetic:big")


# ----------------------------------------------------------------------------------------------------- the size law
def test_radii_follow_the_power_law():
    """r^-3 on [2, 64]: the CDF is (r_min^-2 - r^-2) / (r_min^-2 - r_max^-2); the mean area is analytic."""
    radii = sample_radii(np.random.default_rng(0), 200_000, 3.0, 2.0, 64.0)
    assert radii.min() >= 2.0 and radii.max() <= 64.0
    for r in (2.5, 4.0, 10.0):
        cdf = (2.0 ** -2 - r ** -2) / (2.0 ** -2 - 64.0 ** -2)
        assert abs((radii <= r).mean() - cdf) < 0.005  # binomial SE ≤ 0.0011
    expected_area = np.pi * np.log(32.0) / ((2.0 ** -2 - 64.0 ** -2) / 2)
    assert mean_disc_area(3.0, 2.0, 64.0) == pytest.approx(expected_area, rel=1e-12)
    assert np.pi * np.mean(radii ** 2) == pytest.approx(expected_area, rel=0.02)


# -------------------------------------------------------------------------------------------------- image statistics
def test_power_spectrum_slope_near_minus_two(images_128):
    """Documented: the mean luminance spectrum over 0.02-0.25 cycles/px has slope -2.0 (measured -2.01; 1/f²)."""
    images, _ = images_128
    power = 0
    for image in images:
        frequency, p = radial_power_spectrum(luminance(image))
        power = power + p
    assert -2.4 < spectrum_slope(frequency, power) < -1.8


def test_spectrum_slope_of_a_synthetic_power_law():
    """The estimator itself: white noise shaped to a 1/f² power spectrum gives -2 (4 fields: -1.96)."""
    rng = np.random.default_rng(1)
    n = 128
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n)))
    f[0, 0] = 1.0
    power = 0
    for _ in range(4):
        field = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) / f))
        frequency, p = radial_power_spectrum(field)
        power = power + p
    assert spectrum_slope(frequency, power) == pytest.approx(-2.0, abs=0.1)


def test_occlusion_edge_density_matches_dead_leaves_theory():
    """Boundary length per unit area is E[perimeter]/E[area] (Matheron). Eight 256-px images: measured/theory 0.93
    (a leaf covering much of one image makes the per-image density vary by ±25 %, hence 8 images and 10 %)."""
    model = DeadLeavesModel()
    labels = [dead_leaves_labels(image_rng(0, i), 256, 256, model)[0] for i in range(8)]
    measured = np.mean([occlusion_edge_density(lab) for lab in labels])
    assert measured == pytest.approx(expected_edge_density(model, 256, 256), rel=0.1)


def test_leaf_colours_follow_the_colour_model():
    model = DeadLeavesModel()
    colours = leaf_colours(np.random.default_rng(2), 40_000, model).astype(np.float64)
    assert colours.min() >= 0.0 and colours.max() <= 1.0
    # Clipping to the RGB cube moves the mean and the correlations little (measured: 0.009, 0.013).
    np.testing.assert_allclose(colours.mean(axis=0), model.colour_mean, atol=0.015)
    cov = np.asarray(model.colour_cov)
    correlation = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    np.testing.assert_allclose(np.corrcoef(colours.T), correlation, atol=0.02)


def test_pixel_colours_are_photograph_like(images_128):
    """Pixels of 8 images: mean within 0.06 of the model mean (a few large leaves dominate each image), channels
    strongly correlated as in photographs (R-G, G-B > 0.7)."""
    images, _ = images_128
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255.0
    np.testing.assert_allclose(pixels.mean(axis=0), DeadLeavesModel().colour_mean, atol=0.06)
    correlation = np.corrcoef(pixels.T)
    assert correlation[0, 1] > 0.7 and correlation[1, 2] > 0.7
    assert 0.15 < pixels.std() < 0.35


def test_shading_varies_luminance_inside_leaves():
    flat = synthetic_image(0, 1, 96, 96, DeadLeavesModel(shading=0.0))
    shaded = synthetic_image(0, 1, 96, 96)
    labels, _ = dead_leaves_labels(image_rng(0, 1), 96, 96, DeadLeavesModel())
    largest = np.argsort(np.bincount(labels[labels >= 0].ravel()))[-5:]
    flat_range = [np.ptp(luminance(flat)[labels == leaf]) for leaf in largest]
    shaded_range = [np.ptp(luminance(shaded)[labels == leaf]) for leaf in largest]
    assert max(flat_range) == 0.0
    assert max(shaded_range) > 5.0  # amplitudes are uniform in [0, shading]: one of five leaves shows it


# ----------------------------------------------------------------------------------------- sources: independent counts
def test_independent_counts_per_source(tmp_path):
    sample = open_image_source("sample", num_images=30)
    assert sample.num_independent() == 12 and sample.num_independent(5) == 5
    assert sample.source_id(13) == sample.source_id(1) == "skimage:chelsea.png"
    assert "crops" in sample.describe()["description"] and sample.describe()["independent_candidates"] == 12
    assert sample.count_independent([sample.ids[i] for i in (0, 12, 24, 3)]) == 2
    assert sample.source_id_of(sample.ids[25]) == sample.source_id(25) == "skimage:chelsea.png"
    synthetic = open_image_source("synthetic", num_images=30, seed=1)
    assert synthetic.num_independent() == 30 and synthetic.num_independent(7) == 7
    assert len({synthetic.source_id(i) for i in range(30)}) == 30
    noise = open_image_source("noise", num_images=4)
    assert noise.num_independent() == 4
    from PIL import Image
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    folder = open_image_source(tmp_path)
    assert folder.num_independent() == 2 and folder.source_id(1) == "b.png"
    with pytest.raises(IndexError):
        folder.source_id(2)


def test_synthetic_source_in_the_engine():
    """measure_erf on a tiny conv net: the synthetic source is recorded like any other."""
    from erf_tools import measure_erf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1))
    result = measure_erf(model, "synthetic", targets="2", num_images=3, input_size=32, batch_size=2)
    assert result.num_images == 3 and result.image_ids == [f"synthetic[0:{i}]" for i in range(3)]
    source = result.image_source
    assert source["kind"] == "synthetic" and source["independent_candidates"] == 3
    assert source["model"]["exponent"] == 3.0 and source["image_size"] == "input"
    assert result.map.shape == (32, 32) and result.map.sum() > 0
    # The Kim protocol (timm resize + centre crop, crop_pct 0.875) generates at 36 px and crops 32 without resampling.
    timm_like = preprocessing_for("replknet", None, 32)
    assert timm_like.native_size() == (32, 32)


def _figure_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "figures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"figures_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_vs_photos_script_on_a_tiny_model(tmp_path):
    """The validation script end to end on a tiny random conv net (the trained-network run is the lead's)."""
    script = _figure_script("synthetic_vs_photos")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, padding=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 5, padding=2))
    results = script.measure_sources(model, ("synthetic", "sample"), num_images=14, targets="2", input_size=32,
                                     batch_size=7)
    assert results["synthetic"].num_independent_images == 14
    assert results["sample"].num_independent_images == 12  # 14 images, 12 photographs
    summary, reports = script.compare(results, bootstrap=20)
    agreement = summary["agreement"]
    assert agreement["pixels"] > 0 and np.isfinite(agreement["mean_z2"])
    assert agreement["n_second"] == 12
    assert agreement["null_source"] == "synthetic" and np.isfinite(agreement["null_q95_z2"])  # 12 vs 2 splits
    # A source against itself agrees exactly.
    same = script.map_agreement(results["synthetic"], results["synthetic"])
    assert same["mean_z2"] == 0.0
    written = script.draw(results, reports, tmp_path / "cmp.png")
    assert written[0].stat().st_size > 0


def test_map_agreement_is_calibrated_on_simulated_maps():
    """Two sources with the same expected map: mean z² ≈ 1; a shifted one: ≫ 1."""
    from types import SimpleNamespace

    script = _figure_script("synthetic_vs_photos")
    rng = np.random.default_rng(0)
    base = np.exp(-((np.arange(16) - 7.5) ** 2) / 20.0)
    shape = np.outer(base, base)

    def result(centre_shift: int, n: int):
        maps = np.roll(shape, centre_shift, axis=1)[None] * rng.gamma(4.0, 0.25, size=(n, 16, 16))
        total = maps.sum()
        return SimpleNamespace(map=maps.sum(axis=0) / total, per_image_maps=maps, num_images=n,
                               num_independent_images=n, receptive_field_centre=(7.5, 7.5),
                               map_standard_error=maps.std(axis=0, ddof=1) * np.sqrt(n) / total,
                               image_source={"kind": "synthetic"})

    agree = script.map_agreement(result(0, 200), result(0, 150))
    assert 0.8 < agree["mean_z2"] < 1.25 and 0.8 < agree["null_mean_z2"] < 1.25
    # at the counts the statistic has: 150 against the first 200 - 150 = 50 (Welch ν ≈ 84 for equal variances)
    assert agree["null_sizes"] == [150, 50] and agree["expected_z2_gaussian"] == pytest.approx(84 / 82, abs=0.01)
    shifted = script.map_agreement(result(0, 200), result(3, 150))
    assert shifted["mean_z2"] > 5
