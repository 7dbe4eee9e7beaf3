"""SLaK against the official code: reference forward pass, kernel merge, FFT path, key layouts, checkpoints."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from erf_tools import catalogue, measure_erf
from erf_tools.models.slak import SLaK, checkpoint_filter_fn, merge_state_dict
from erf_tools.weights import activate_branches, find_silenced_branches, load_checkpoint
from tests.conformance import (
    assert_close_to_ref,
    assert_matches_manifest,
    load_manifest,
    load_meta,
    load_tensors,
    state_dict_of,
)

REF = "refs/slak_small"
VARIANTS = ["slak_t", "slak_s", "slak_b"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread avoids OpenMP contention on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref() -> tuple[dict, dict[str, torch.Tensor]]:
    return load_meta(REF), load_tensors(REF)


@pytest.fixture()
def small(ref) -> SLaK:
    """The official small config (dims 16..128 x 1.3, kernels 51/49/47/13 + 5) with the fixture's weights."""
    meta, tensors = ref
    model = SLaK(**meta["constructor_kwargs"]).eval()
    model.load_state_dict(state_dict_of(tensors), strict=True)
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(x), model.forward_features(x)


def _assert_matches_ref(model: nn.Module, ref) -> None:
    meta, tensors = ref
    logits, features = _outputs(model, tensors["input"])
    tol = meta["suggested_tolerance"]
    assert_close_to_ref(logits, tensors["logits"], tol["logits"])
    assert_close_to_ref(features, tensors["features"], tol["features"])


def test_small_matches_official_logits_and_features(small, ref):
    _assert_matches_ref(small, ref)
    meta, tensors = ref
    captured = []
    handle = small.get_submodule(SLaK.erf_target).register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        small(tensors["input"])
    handle.remove()
    torch.testing.assert_close(captured[0], small.forward_features(tensors["input"]).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("fft", [False, True], ids=["direct", "fft"])
def test_merged_model_equals_the_training_time_model(small, ref, fft):
    """No official merge exists for the decomposed kernels; the merged model must reproduce the official outputs."""
    merged = copy.deepcopy(small).structural_reparam()
    merged.set_fft_large_kernel(fft)
    assert merged.is_merged and not small.is_merged
    _assert_matches_ref(merged, ref)
    sd = merged.state_dict()
    assert sd["stages.0.0.large_kernel.lkb_reparam.weight"].shape == (20, 1, 51, 51)
    assert sd["stages.3.0.large_kernel.lkb_reparam.weight"].shape == (166, 1, 13, 13)
    assert not any(f".{b}." in k for k in sd for b in ("LoRA1", "LoRA2", "small_conv"))


def test_merge_state_dict_equals_model_merge(small):
    merged_model = copy.deepcopy(small).structural_reparam().state_dict()
    merged_tensors = merge_state_dict(small.state_dict())
    assert list(merged_tensors) == list(merged_model)
    for key, value in merged_tensors.items():
        torch.testing.assert_close(value, merged_model[key], rtol=0, atol=0, msg=key)


def test_merged_kernel_is_the_sum_of_the_centred_branches(small):
    """The merge on one block, by its definition: strips padded along their short side, square padded all round."""
    lk = small.stages[3][0].large_kernel
    folded = {}
    for name in ("LoRA1", "LoRA2", "small_conv"):
        branch = getattr(lk, name)
        scale = branch.bn.weight / torch.sqrt(branch.bn.running_var + branch.bn.eps)
        folded[name] = (branch.conv.weight * scale.view(-1, 1, 1, 1), branch.bn.bias - branch.bn.running_mean * scale)
    expected = torch.zeros(166, 1, 13, 13)
    expected[:, :, :, 4:9] += folded["LoRA1"][0]  # 13 x 5
    expected[:, :, 4:9, :] += folded["LoRA2"][0]  # 5 x 13
    expected[:, :, 4:9, 4:9] += folded["small_conv"][0]
    kernel, bias = lk.get_equivalent_kernel_bias()
    torch.testing.assert_close(kernel, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, sum(b for _, b in folded.values()), rtol=1e-6, atol=1e-7)


def test_merge_keeps_a_frozen_model_frozen(small):
    small.requires_grad_(False).structural_reparam()
    assert not any(p.requires_grad for p in small.parameters())


@pytest.mark.parametrize("decom,bn", [(False, True), (True, False)], ids=["lkb_origin", "no_bn"])
def test_other_official_layouts_merge_exactly(decom, bn):
    model = SLaK(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), kernel_size=(15, 13, 11, 7, 3), Decom=decom, bn=bn,
                 num_classes=4).eval()
    activate_branches(model, seed=3)
    keys = model.state_dict()
    assert ("stages.0.0.large_kernel.lkb_origin.conv.weight" in keys) == (not decom)
    assert any(".bn." in k for k in keys) == bn
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = _outputs(model, x)[1]
    merged = _outputs(copy.deepcopy(model).structural_reparam(), x)[1]
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_kernel_arguments_are_checked():
    with pytest.raises(ValueError, match="odd"):
        SLaK(dims=(8, 8, 8, 8), kernel_size=(50, 49, 47, 13, 5), Decom=True)
    with pytest.raises(ValueError, match="k < K"):
        SLaK(dims=(8, 8, 8, 8), kernel_size=(7, 7, 7, 7, 100), Decom=True)
    # SLaK's ConvNeXt baseline of the ERF script: 7x7 lkb_origin + BN, no small kernel since k > K
    convnext_like = SLaK(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_size=(7, 7, 7, 7, 100))
    assert not any("small_conv" in k for k in convnext_like.state_dict())


def test_input_gradients_of_merged_fft_model_equal_the_direct_ones(small, ref):
    """The ERF objective (RepLKNet protocol) through the training-time direct convs and the merged FFT convs."""
    _, tensors = ref
    fast = copy.deepcopy(small).structural_reparam()
    fast.set_fft_large_kernel(True)
    grads = []
    for model in (small, fast):
        x = tensors["input"][:1].clone().requires_grad_(True)
        model.forward_features(x)[0, :, 1, 1].relu().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


def test_measure_erf_fast_merges_and_uses_ffts(small, ref):
    _, tensors = ref
    reference = measure_erf(small, tensors["input"], batch_size=2)
    fast = measure_erf(small, tensors["input"], batch_size=2, fast=True)
    engine = fast.timing["engine"]
    assert engine["reparameterized"] and engine["fft_depthwise_convs"] == 4  # the 51/49/47 px kernels, not 13
    assert not small.is_merged  # the caller's model is untouched
    assert abs(fast.map - reference.map).max() <= 1e-4 * abs(reference.map).max()


@pytest.mark.parametrize("name", VARIANTS)
def test_registered_model_matches_official_manifest(name):
    with torch.device("meta"):  # layout only
        model = timm.create_model(name)
    assert_matches_manifest(model, name)
    config = load_manifest(name)["config"]
    assert [f["num_chs"] for f in model.feature_info] == config["dims"]


def test_models_table_rows_have_the_manifest_parameter_counts():
    rows = {row["name"]: row for row in catalogue.models_table("slak_*")}
    assert sorted(rows) == sorted(VARIANTS)
    for name, row in rows.items():
        assert round(row["params_m"] * 1e6) == load_manifest(name)["num_params"]
        assert row["family"] == "slak" and row["erf_layer"] == "stages.3"


def test_pretrained_cfgs_and_silenced_init():
    for name in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
        assert cfg.mean == (0.485, 0.456, 0.406) and "Google Drive id" in cfg.notes[0]
    model = SLaK(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_size=(7, 7, 7, 7, 3), Decom=True)
    assert len(find_silenced_branches(model)) == 4  # the 1e-6 layer scale of every block


def _save(tmp_path, name: str, checkpoint: dict):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_official_training_checkpoint_loads(tmp_path, ref):
    meta, tensors = ref
    state = state_dict_of(tensors)
    path = _save(tmp_path, "checkpoint-best.pth", {"model": state, "epoch": 299, "model_ema": state})
    model = SLaK(**meta["constructor_kwargs"]).eval()
    assert load_checkpoint(model, path).source == "checkpoint"
    _assert_matches_ref(model, ref)


def test_earlier_decom1_decom2_names_are_mapped(ref):
    meta, tensors = ref
    old = {k.replace(".LoRA1.", ".Decom1.").replace(".LoRA2.", ".Decom2."): v
           for k, v in state_dict_of(tensors).items()}
    model = SLaK(**meta["constructor_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": old}, model), strict=True)
    _assert_matches_ref(model, ref)


def test_layouts_are_reconciled_both_ways(tmp_path, small, ref):
    meta, _ = ref
    merged_sd = copy.deepcopy(small).structural_reparam().state_dict()
    model = SLaK(**meta["constructor_kwargs"]).eval()
    load_checkpoint(model, _save(tmp_path, "merged.pth", {"model": merged_sd}))
    assert model.is_merged
    _assert_matches_ref(model, ref)

    built_merged = SLaK(**meta["constructor_kwargs"], small_kernel_merged=True).eval()
    assert built_merged.is_merged
    load_checkpoint(built_merged, _save(tmp_path, "train.pth", {"model": small.state_dict()}))
    _assert_matches_ref(built_merged, ref)


def test_timm_pretrained_path_uses_the_filter(tmp_path, small, ref):
    meta, _ = ref
    path = _save(tmp_path, "slak_small.pth", {"model": small.state_dict()})
    kwargs = {k: meta["constructor_kwargs"][k] for k in ("depths", "dims", "num_classes")}
    overlay = dict(file=str(path), num_classes=10)
    model = timm.create_model("slak_t.in1k", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    _assert_matches_ref(model, ref)


def test_forward_intermediates_and_features_only(small, ref):
    _, tensors = ref
    x = tensors["input"]
    assert [f["reduction"] for f in small.feature_info] == [4, 8, 16, 32]
    with torch.no_grad():
        final, intermediates = small.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in intermediates] == [(20, 24, 24), (41, 12, 12), (83, 6, 6), (166, 3, 3)]
        torch.testing.assert_close(final, small.forward_features(x), rtol=0, atol=0)
    kwargs = {k: v for k, v in load_meta(REF)["constructor_kwargs"].items() if k in ("depths", "dims")}
    backbone = timm.create_model("slak_t", features_only=True, out_indices=(1, 3), **kwargs).eval()
    assert backbone.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        assert [tuple(f.shape) for f in backbone(x)] == [(2, 41, 12, 12), (2, 166, 3, 3)]
    small.reset_classifier(0)
    with torch.no_grad():
        assert small(x).shape == (2, 166)
