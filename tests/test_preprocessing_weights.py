"""Preprocessing against the model's own data config: ``preprocessing="model"`` and the mismatch warning."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

from erf_tools import measure_erf
from erf_tools.images import PreprocessingWarning, preprocessing_for, preprocessing_mismatch
from erf_tools.protocols import resolve_options


@pytest.fixture(scope="module")
def replknet_xl():
    with torch.device("meta"):  # only its pretrained_cfg is read
        return timm.create_model("replknet_xl", pretrained=False)


def test_model_rule_keeps_the_protocol_warp_with_the_model_normalisation(replknet_xl):
    model_rule = preprocessing_for("model", replknet_xl, 512)
    assert model_rule.size == (512, 512) and model_rule.resize == "warp"
    assert model_rule.mean == (0.5, 0.5, 0.5) and model_rule.std == (0.5, 0.5, 0.5)
    assert preprocessing_mismatch(model_rule, replknet_xl) == []
    assert resolve_options("replknet", preprocessing="model").preprocessing == "model"


def test_replknet_preset_differs_from_replknet_xl_training(replknet_xl):
    differences = preprocessing_mismatch(preprocessing_for("replknet", replknet_xl, 512), replknet_xl)
    assert differences == ["mean (0.485, 0.456, 0.406) instead of the model's (0.5, 0.5, 0.5)",
                           "std (0.229, 0.224, 0.225) instead of the model's (0.5, 0.5, 0.5)"]
    assert preprocessing_mismatch(preprocessing_for("timm", replknet_xl, None), replknet_xl) == []


def test_warning_only_for_trained_weights(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False)  # trained with mean = std = 0.5 (timm cfg)
    path = tmp_path / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    common = dict(input_size=32, num_images=1, batch_size=1)
    with pytest.warns(PreprocessingWarning, match="preprocessing=model"):
        measure_erf("test_resnet", "sample", weights=str(path), **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PreprocessingWarning)
        measure_erf("test_resnet", "sample", weights="active", **common)
        result = measure_erf("test_resnet", "sample", weights=str(path), preprocessing="model", **common)
    assert tuple(result.preprocessing["mean"]) == (0.5, 0.5, 0.5)
