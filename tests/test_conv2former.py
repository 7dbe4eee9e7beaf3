"""Conv2Former against the official code (conformance fixtures) and the timm model interface."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import erf_tools.models  # noqa: F401  (registers the models with timm)
from erf_tools.models.conv2former import Conv2Former, checkpoint_filter_fn, infer_kernel_size
from erf_tools.weights import activate_branches, find_silenced_branches, load_checkpoint
from tests.conformance import assert_close_to_ref, assert_matches_manifest, load_meta, load_tensors, state_dict_of

TAG = "refs/conv2former_small"
KERNELS = {"n": 7, "t": 11, "s": 11, "b": 11, "l": 11}


@pytest.fixture(scope="module")
def reference():
    meta, tensors = load_meta(TAG), load_tensors(TAG)
    model = Conv2Former(**meta["constructor_kwargs"]).eval()
    model.load_state_dict(state_dict_of(tensors), strict=True)
    return meta, tensors, model


def test_reference_forward(reference) -> None:
    meta, tensors, model = reference
    with torch.no_grad():
        features = model.forward_features(tensors["input"])
        logits = model.forward_head(features)
        assert torch.equal(model(tensors["input"]), logits)
    assert features.shape == (2, 128, 2, 2)  # stages[3], before the 1280-wide head conv
    assert_close_to_ref(features, tensors["features"], meta["suggested_tolerance"]["features"])
    assert_close_to_ref(logits, tensors["logits"], meta["suggested_tolerance"]["logits"])


def test_reference_erf_target_is_the_features(reference) -> None:
    _, tensors, model = reference
    captured = []
    handle = model.get_submodule(model.erf_target).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            features = model.forward_features(tensors["input"])
    finally:
        handle.remove()
    assert torch.equal(captured[0], features)


@pytest.mark.parametrize("size", [320, 1024])
def test_reference_net_runs_at_the_protocol_sizes(reference, size: int) -> None:
    _, tensors, model = reference
    x = F.interpolate(tensors["input"][:1], size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        features = model.forward_features(x)
    assert features.shape == (1, 128, size // 32, size // 32) and torch.isfinite(features).all()


def test_reference_checkpoint_loads_through_load_checkpoint(reference, tmp_path) -> None:
    meta, tensors, model = reference
    path = tmp_path / "conv2former.pth"
    torch.save({"model": state_dict_of(tensors)}, path)
    fresh = Conv2Former(**meta["constructor_kwargs"]).eval()
    assert load_checkpoint(fresh, path).init_mode == "loaded"
    with torch.no_grad():
        assert torch.equal(fresh(tensors["input"]), model(tensors["input"]))


def test_preview_names_and_kernel_mismatch(reference) -> None:
    meta, tensors, model = reference
    official = state_dict_of(tensors)
    preview = {k.replace(".attn.att.", ".attn.a."): v for k, v in official.items()}  # 2022 convmod.py names
    assert list(checkpoint_filter_fn({"state_dict": preview}, model)) == list(official)
    assert infer_kernel_size({"model": official}) == 11
    kernel_7 = Conv2Former(**dict(meta["constructor_kwargs"], kernel_size=7))
    with pytest.raises(ValueError, match="kernel_size=11"):
        checkpoint_filter_fn(official, kernel_7)


def test_layer_scales_silence_branches_until_activated() -> None:
    model = Conv2Former(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    silenced = find_silenced_branches(model)
    assert "stages.0.0.layer_scale_1" in silenced and "stages.3.0.layer_scale_2" in silenced
    activate_branches(model, seed=0)
    assert find_silenced_branches(model) == []


@pytest.mark.parametrize("variant", sorted(KERNELS))
def test_registered_model_matches_the_official_manifest(variant: str) -> None:
    name = f"conv2former_{variant}"
    with torch.device("meta"):  # L has 199M parameters: shapes only
        model = timm.create_model(name)
    assert_matches_manifest(model, name)
    assert model.stages[0][0].attn.att[2].kernel_size == (KERNELS[variant],) * 2
    cfg = model.pretrained_cfg
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["classifier"] == "pred" and cfg["input_size"] == (3, 224, 224)
    assert model.erf_target == "stages.3" == model.feature_info[-1]["module"]


def test_timm_interface_on_a_small_conv2former() -> None:
    kwargs = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10)
    model = timm.create_model("conv2former_n", **kwargs).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in intermediates] == [(16, 24, 24), (32, 12, 12), (64, 6, 6), (128, 3, 3)]
        assert torch.equal(final, model.forward_features(x))
        assert model.forward_head(final, pre_logits=True).shape == (1, 1280)
    model.reset_classifier(0)
    assert model(x).shape == (1, 1280)
    features = timm.create_model("conv2former_n", features_only=True, out_indices=(1, 3), **kwargs)
    assert [f.shape[1] for f in features(x)] == [32, 128]
    assert timm.create_model("conv2former_b", kernel_size=7, pretrained_cfg="in22k_ft_in1k_384", depths=(1, 1, 1, 1),
                             dims=(8, 16, 32, 64)).pretrained_cfg["input_size"] == (3, 384, 384)
