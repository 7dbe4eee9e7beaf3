"""RepLKNet against the official code: reference forward passes, re-parameterisation, key layouts, checkpoints."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from erf_tools.layers.fft_conv import fft_depthwise_conv2d
from erf_tools.models.replknet import RepLKNet, checkpoint_filter_fn, merge_state_dict
from erf_tools.weights import find_silenced_branches, load_checkpoint
from tests.conformance import (
    assert_close_to_ref,
    assert_matches_manifest,
    load_meta,
    load_tensors,
    state_dict_of,
)

REF = "refs/replknet_small"
VARIANTS = ["replknet_31b", "replknet_31l", "replknet_xl", "replknet_13"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: with 2 OpenMP threads on a shared 2-core machine, a 0.05 s forward can take 3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref() -> tuple[dict, dict[str, torch.Tensor]]:
    return load_meta(REF), load_tensors(REF)


@pytest.fixture()
def small(ref) -> RepLKNet:
    """The official small config with the fixture's randomised weights, in eval mode."""
    meta, tensors = ref
    model = RepLKNet(**meta["constructor_kwargs"]).eval()
    model.load_state_dict(state_dict_of(tensors), strict=True)
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(x), model.forward_features(x)


def test_small_matches_official_logits_and_features(small, ref):
    meta, tensors = ref
    logits, features = _outputs(small, tensors["input"])
    assert_close_to_ref(logits, tensors["logits"], meta["suggested_tolerance"]["logits"])
    assert_close_to_ref(features, tensors["features"], meta["suggested_tolerance"]["features"])


def test_structural_reparam_matches_official_merged_model(small, ref):
    meta, tensors = ref
    merged = copy.deepcopy(small).structural_reparam()
    assert merged.is_merged and not small.is_merged
    logits, features = _outputs(merged, tensors["input"])
    tol = meta["suggested_tolerance"]
    assert_close_to_ref(logits, tensors["logits_merged"], tol["logits"])
    assert_close_to_ref(features, tensors["features_merged"], tol["features"])
    # merged vs unmerged: the same function up to float rounding
    assert_close_to_ref(features, _outputs(small, tensors["input"])[1], tol["merged_vs_unmerged"])

    fused = state_dict_of(tensors, "merged_state_dict.")
    own = merged.state_dict()
    assert fused and all(k in own for k in fused)
    for key, value in fused.items():
        torch.testing.assert_close(own[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # everything but the large-kernel branches is untouched, in the official order
    assert [k for k in own if "lkb_reparam" not in k] == [
        k for k in small.state_dict() if ".lkb_origin." not in k and ".small_conv." not in k]


def test_structural_reparam_keeps_a_frozen_model_frozen(small):
    small.requires_grad_(False).structural_reparam()
    assert not any(p.requires_grad for p in small.parameters())


def test_merge_state_dict_equals_model_merge(small):
    merged_model = copy.deepcopy(small).structural_reparam().state_dict()
    merged_tensors = merge_state_dict(small.state_dict())
    assert list(merged_tensors) == list(merged_model)
    for key, value in merged_tensors.items():
        torch.testing.assert_close(value, merged_model[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", VARIANTS)
def test_registered_model_matches_official_manifest(name):
    with torch.device("meta"):  # layout only: no memory, no init cost
        model = timm.create_model(name)
    assert_matches_manifest(model, name)


def test_merged_manifest_after_structural_reparam():
    with torch.device("meta"):
        model = timm.create_model("replknet_31b")
    model.structural_reparam()
    assert_matches_manifest(model, "replknet_31b_merged")
    with torch.device("meta"):
        built_merged = timm.create_model("replknet_31b", small_kernel_merged=True)
    assert_matches_manifest(built_merged, "replknet_31b_merged")


def test_xl_has_no_small_kernel_and_merging_only_folds_bn():
    with torch.device("meta"):
        model = timm.create_model("replknet_xl")
    assert not any(".small_conv." in k for k in model.state_dict())
    model.structural_reparam()
    assert sum(p.numel() for p in model.parameters()) == 335_399_656  # spec: XL merged parameter count


def test_pretrained_cfgs():
    cfg = timm.models.get_pretrained_cfg("replknet_xl.megdata73m_ft_in1k_320")
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5)
    assert cfg.input_size == (3, 320, 320) and cfg.file == "RepLKNet-XL_MegData73M_ImageNet1K.pth"
    cfg = timm.models.get_pretrained_cfg("replknet_31b.in1k")
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875
    assert cfg.file == "RepLKNet-31B_ImageNet-1K_224.pth" and cfg.interpolation == "bicubic"
    cfg = timm.models.get_pretrained_cfg("replknet_31l.in22k_ft_in1k_384")
    assert cfg.input_size == (3, 384, 384) and cfg.crop_pct == 1.0 and cfg.crop_mode == "squash"
    assert timm.models.get_pretrained_cfg("replknet_31b.in22k").num_classes == 21841


def _save(tmp_path, name: str, checkpoint: dict):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_wrapped_training_checkpoint_loads(tmp_path, ref):
    meta, tensors = ref
    path = _save(tmp_path, "train.pth", {"model": state_dict_of(tensors), "epoch": 299})
    model = RepLKNet(**meta["constructor_kwargs"]).eval()
    info = load_checkpoint(model, path)
    assert info.source == "checkpoint" and not model.is_merged
    assert_close_to_ref(_outputs(model, tensors["input"])[0], tensors["logits"], meta["suggested_tolerance"]["logits"])


def test_merged_checkpoint_merges_the_model_then_loads(tmp_path, small, ref):
    meta, tensors = ref
    merged_sd = copy.deepcopy(small).structural_reparam().state_dict()
    path = _save(tmp_path, "deploy.pth", {"model": merged_sd})
    model = RepLKNet(**meta["constructor_kwargs"]).eval()
    load_checkpoint(model, path)  # strict
    assert model.is_merged
    logits, features = _outputs(model, tensors["input"])
    assert_close_to_ref(logits, tensors["logits_merged"], meta["suggested_tolerance"]["logits"])
    assert_close_to_ref(features, tensors["features_merged"], meta["suggested_tolerance"]["features"])


def test_unmerged_checkpoint_loads_into_merged_model(tmp_path, ref):
    meta, tensors = ref
    path = _save(tmp_path, "train.pth", {"state_dict": state_dict_of(tensors)})
    model = RepLKNet(**dict(meta["constructor_kwargs"], small_kernel_merged=True)).eval()
    load_checkpoint(model, path)
    assert_close_to_ref(_outputs(model, tensors["input"])[0], tensors["logits_merged"],
                        meta["suggested_tolerance"]["logits"])


def test_checkpoint_with_other_head_resets_classifier(tmp_path, small, ref):
    meta, tensors = ref
    state = small.state_dict()
    state["head.weight"], state["head.bias"] = torch.randn(7, 128), torch.randn(7)
    model = RepLKNet(**meta["constructor_kwargs"]).eval()
    load_checkpoint(model, _save(tmp_path, "in22k.pth", {"model": state}))
    assert model.head.out_features == 7 and model.num_classes == 7
    assert_close_to_ref(_outputs(model, tensors["input"])[1], tensors["features"],
                        meta["suggested_tolerance"]["features"])


def test_megengine_layout_is_refused_clearly(small):
    with pytest.raises(ValueError, match="MegEngine"):
        checkpoint_filter_fn({"blocks.0.dw.dw_large.conv.weight": torch.zeros(1)}, small)


def test_fft_path_matches_official_values_and_gradients(small, ref):
    meta, tensors = ref
    fft_model = copy.deepcopy(small)
    fft_model.set_fft_large_kernel(True)
    logits, features = _outputs(fft_model, tensors["input"])
    assert_close_to_ref(logits, tensors["logits"], meta["suggested_tolerance"]["logits"])
    assert_close_to_ref(features, tensors["features"], meta["suggested_tolerance"]["features"])
    grads = []
    for model in (small, fft_model.structural_reparam()):
        x = tensors["input"][:1].clone().requires_grad_(True)
        model.forward_features(x)[0, :, 1, 1].relu().sum().backward()  # the RepLKNet ERF objective
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


@pytest.mark.parametrize("size,kernel", [((17, 23), 31), ((40, 33), 5), ((9, 9), 13), ((3, 5), 31)])
def test_fft_depthwise_conv2d_equals_direct_convolution(size, kernel):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, *size, generator=generator)
    weight = torch.randn(6, 1, kernel, kernel, generator=generator)
    bias = torch.randn(6, generator=generator)
    expected = F.conv2d(x, weight, bias, padding=kernel // 2, groups=6)
    torch.testing.assert_close(fft_depthwise_conv2d(x, weight, bias), expected, rtol=1e-4, atol=1e-4)


def test_forward_intermediates_feature_info_and_erf_target(small, ref):
    _, tensors = ref
    x = tensors["input"]
    assert [f["reduction"] for f in small.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in small.feature_info] == [f"stages.{i}" for i in range(4)]
    with torch.no_grad():
        logits, features = small(x), small.forward_features(x)
        final, intermediates = small.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in intermediates] == [(16, 24, 24), (32, 12, 12), (64, 6, 6), (128, 3, 3)]
        torch.testing.assert_close(final, features, rtol=0, atol=0)
        torch.testing.assert_close(small.forward_head(final), logits, rtol=0, atol=0)
        early = small.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[1], rtol=0, atol=0)

        captured = []
        target = small.get_submodule(RepLKNet.erf_target)
        handle = target.register_forward_hook(lambda module, args, out: captured.append(out))
        small(x)
        handle.remove()
    torch.testing.assert_close(captured[0], features, rtol=0, atol=0)


def test_features_only_via_timm(ref):
    meta, tensors = ref
    kwargs = {k: meta["constructor_kwargs"][k] for k in ("large_kernel_sizes", "layers", "channels")}
    backbone = timm.create_model("replknet_31b", features_only=True, out_indices=(1, 3), **kwargs).eval()
    assert backbone.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        features = backbone(tensors["input"])
    assert [tuple(f.shape) for f in features] == [(2, 32, 12, 12), (2, 128, 3, 3)]
    early = timm.create_model("replknet_31b", features_only=True, out_indices=(0, 1), **kwargs).eval()
    assert len(early.model.stages) == 2 and len(early.model.transitions) == 1  # later stages pruned
    with torch.no_grad():
        assert [tuple(f.shape) for f in early(tensors["input"])] == [(2, 16, 24, 24), (2, 32, 12, 12)]


def test_reset_classifier_and_pre_logits(small, ref):
    _, tensors = ref
    small.reset_classifier(0)
    with torch.no_grad():
        pooled = small(tensors["input"])
    assert pooled.shape == (2, 128)
    small.reset_classifier(5)
    assert small.get_classifier().out_features == 5


def test_sync_bn_flag_is_not_sticky(ref):
    meta, _ = ref
    RepLKNet(**dict(meta["constructor_kwargs"], use_sync_bn=True))
    later = RepLKNet(**meta["constructor_kwargs"])
    norms = [m for m in later.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)


def test_random_init_has_no_silenced_branch(ref):
    meta, _ = ref
    model = RepLKNet(**meta["constructor_kwargs"])
    assert find_silenced_branches(model) == []
    before = model.stem[0].conv.weight.clone()
    model.init_weights()
    assert not torch.equal(before, model.stem[0].conv.weight)


@pytest.mark.parametrize("variant", ["unmerged", "merged", "fft"])
def test_input_gradient_maps_match_official_erf_protocol(small, variant):
    """The model side of the RepLKNet ERF protocol (conformance 3a): the per-image maps ΣRGB ReLU(∂S/∂x), with
    S = Σ_c ReLU(F[0, c, h//2, w//2]) on ``forward_features``, in all three computation paths."""
    meta, tensors = load_meta("erf/replknet_protocol"), load_tensors("erf/replknet_protocol")
    if variant != "unmerged":
        small.structural_reparam()
    small.set_fft_large_kernel(variant == "fft")
    maps = []
    for i in range(tensors["inputs"].shape[0]):
        x = tensors["inputs"][i:i + 1].clone().requires_grad_(True)
        features = small.forward_features(x)
        h, w = features.shape[-2:]
        features[0, :, h // 2, w // 2].relu().sum().backward()
        maps.append(x.grad[0].relu().sum(0))
    assert_close_to_ref(torch.stack(maps), tensors["per_image_maps"],
                        meta["suggested_tolerance"]["per_image_maps_and_mean_map"])


def test_timm_pretrained_path_uses_the_filter(tmp_path, small, ref):
    """timm.create_model(pretrained=True) with a local official file goes through checkpoint_filter_fn too."""
    meta, tensors = ref
    path = _save(tmp_path, "RepLKNet-31B_ImageNet-1K_224.pth",
                 {"model": copy.deepcopy(small).structural_reparam().state_dict()})
    kwargs = {k: meta["constructor_kwargs"][k] for k in ("large_kernel_sizes", "layers", "channels")}
    model = timm.create_model("replknet_31b.in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **kwargs).eval()
    assert model.is_merged
    assert_close_to_ref(_outputs(model, tensors["input"])[0], tensors["logits_merged"],
                        meta["suggested_tolerance"]["logits"])
