"""UniRepLKNet against the official code: reference forward pass, deploy conversion, both key layouts, checkpoints."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models import reparameterize_model
from torch import nn

from erf_tools import catalogue, measure_erf
from erf_tools.layers.reparam import dilated_to_dense
from erf_tools.models.unireplknet import (
    GRN,
    UniRepLKNet,
    UniRepLKNetBlock,
    checkpoint_filter_fn,
    default_kernel_sizes,
    reparameterize_state_dict,
)
from erf_tools.weights import activate_branches, load_checkpoint
from tests.conformance import (
    assert_close_to_ref,
    assert_matches_manifest,
    load_manifest,
    load_meta,
    load_tensors,
    state_dict_of,
)

REF = "refs/unireplknet_small"
#: Deploy-layout parameter counts (deploy=True, 1000 classes) counted with the official code; the README's sizes.
DEPLOY_PARAMS = {"a": 4_437_300, "f": 6_235_216, "p": 10_741_704, "n": 18_318_560, "t": 31_037_980,
                 "s": 55_645_984, "b": 98_008_456, "l": 218_454_616, "xl": 386_529_064}
VARIANTS = [f"unireplknet_{v}" for v in DEPLOY_PARAMS]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref() -> tuple[dict, dict[str, torch.Tensor]]:
    return load_meta(REF), load_tensors(REF)


@pytest.fixture()
def small(ref) -> UniRepLKNet:
    """The official small config (K = 3 and 13 blocks, SE, GRN) with the fixture's weights, training layout."""
    meta, tensors = ref
    model = UniRepLKNet(**meta["constructor_kwargs"]).eval()
    model.load_state_dict(state_dict_of(tensors), strict=True)
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(x), model.forward_features(x)


def _assert_matches(model: nn.Module, ref, merged: bool) -> None:
    meta, tensors = ref
    logits, features = _outputs(model, tensors["input"])
    tol = meta["suggested_tolerance"]
    suffix = "_merged" if merged else ""
    assert_close_to_ref(logits, tensors[f"logits{suffix}"], tol["logits"])
    assert_close_to_ref(features, tensors[f"features{suffix}"], tol["features"])


def _deploy_state(ref) -> dict[str, torch.Tensor]:
    """The official merged layout assembled from the fixture (README of the fixtures, deploy test)."""
    meta, tensors = ref
    fused, plain = state_dict_of(tensors, "merged_state_dict."), state_dict_of(tensors)
    return {k: fused[k] if k in fused else plain[k] for k, _ in meta["merged"]["merged_state_dict"]}


def test_small_matches_official_logits_and_features(small, ref):
    _assert_matches(small, ref, merged=False)
    captured = []
    handle = small.get_submodule(UniRepLKNet.erf_target).register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        small(ref[1]["input"])
    handle.remove()
    torch.testing.assert_close(captured[0], small.forward_features(ref[1]["input"]), rtol=0, atol=0)


def test_structural_reparam_matches_the_official_deploy_conversion(small, ref):
    meta, tensors = ref
    merged = copy.deepcopy(small).structural_reparam()
    assert merged.is_merged and not small.is_merged
    _assert_matches(merged, ref, merged=True)
    # the deploy model equals the training-time one on the reference input
    tol = meta["suggested_tolerance"]["merged_vs_unmerged"]
    for ours, unmerged in zip(_outputs(merged, tensors["input"]), _outputs(small, tensors["input"])):
        assert_close_to_ref(ours, unmerged, tol)
    own = merged.state_dict()
    official = [[k, list(s)] for k, s in meta["merged"]["merged_state_dict"]]
    assert [[k, list(v.shape)] for k, v in own.items()] == official
    for key, value in state_dict_of(tensors, "merged_state_dict.").items():
        torch.testing.assert_close(own[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert sum(p.numel() for p in merged.parameters()) == meta["merged"]["merged_num_params"]


def test_deploy_model_loads_the_official_deploy_layout_strictly(ref):
    meta, _ = ref
    model = UniRepLKNet(**dict(meta["constructor_kwargs"], deploy=True)).eval()
    model.load_state_dict(_deploy_state(ref), strict=True)
    assert model.is_merged
    _assert_matches(model, ref, merged=True)


def test_state_dict_twin_and_timm_reparameterize_model_equal_the_model_conversion(small):
    merged = copy.deepcopy(small).structural_reparam().state_dict()
    twin = reparameterize_state_dict(small.state_dict())
    assert list(twin) == list(merged)
    for key, value in twin.items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=0, msg=key)
    via_timm = reparameterize_model(small).state_dict()  # calls every block's reparameterize()
    assert list(via_timm) == list(merged)
    for key, value in via_timm.items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=0, msg=key)


def test_reparameterize_keeps_a_frozen_model_frozen(small):
    small.requires_grad_(False).structural_reparam()
    assert not any(p.requires_grad for p in small.parameters())


def test_dilated_kernel_equals_its_dense_equivalent():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 23, 23, generator=generator, dtype=torch.float64)
    for k, r in [(5, 1), (7, 2), (3, 3), (3, 5)]:
        w = torch.randn(4, 1, k, k, generator=generator, dtype=torch.float64)
        dilated = nn.functional.conv2d(x, w, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=4)
        dense = dilated_to_dense(w, r)
        assert dense.shape[-1] == r * (k - 1) + 1
        torch.testing.assert_close(nn.functional.conv2d(x, dense, padding=dense.shape[-1] // 2, groups=4), dilated)


@pytest.mark.parametrize("kernel", [0, 5, 7, 9, 11, 15, 17])
def test_other_kernel_sizes_reparameterize_exactly(kernel):
    block = UniRepLKNetBlock(8, kernel).eval()
    activate_branches(block, seed=kernel)
    x = torch.randn(2, 8, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert block.merged and block.gamma is None


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="no default kernel sizes"):
        UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="one kernel per block"):
        UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=((3,), (3,), (3, 3), (3,)))
    with pytest.raises(ValueError, match="0, 3, 5 or >= 7"):
        UniRepLKNetBlock(8, 4)
    with pytest.raises(ValueError, match="branch table"):
        UniRepLKNetBlock(8, 19)
    with pytest.raises(ValueError, match="init_cfg"):
        UniRepLKNet(init_cfg={"checkpoint": None}, num_classes=0)
    with pytest.raises(TypeError):
        UniRepLKNet(depths=(2, 2, 6, 2), dims=(8, 8, 8, 8), kernel_size=13)  # misspelt: not silently swallowed
    assert default_kernel_sizes((3, 3, 18, 3))[2] == (13, 3) * 9


@pytest.mark.parametrize("name", VARIANTS)
def test_registered_model_matches_official_manifest_and_deploy_count(name):
    with torch.device("meta"):  # layout only
        model = timm.create_model(name)
        deploy = timm.create_model(name, deploy=True)
    assert_matches_manifest(model, name)
    assert sum(p.numel() for p in deploy.parameters()) == DEPLOY_PARAMS[name.rsplit("_", 1)[1]]


def test_t_deploy_manifest_built_and_converted():
    with torch.device("meta"):
        built = timm.create_model("unireplknet_t", deploy=True)
        converted = timm.create_model("unireplknet_t").structural_reparam()  # on meta tensors: shapes only
    assert_matches_manifest(built, "unireplknet_t_deploy")
    assert_matches_manifest(converted, "unireplknet_t_deploy")


def test_models_table_rows_have_the_manifest_parameter_counts():
    rows = {row["name"]: row for row in catalogue.models_table("unireplknet_*")}
    assert sorted(rows) == sorted(VARIANTS)
    for name, row in rows.items():
        assert round(row["params_m"] * 1e6) == load_manifest(name)["num_params"]
        assert row["family"] == "unireplknet" and row["erf_layer"] == "stages.3"
    assert "unireplknet_t_in1k_224_acc83.21.pth" in rows["unireplknet_t"]["weights"]


def test_pretrained_cfgs_name_the_official_hub_files():
    cfg = timm.models.get_pretrained_cfg("unireplknet_t.in1k")
    assert cfg.hf_hub_id == "DingXiaoH/UniRepLKNet" and cfg.hf_hub_filename == "unireplknet_t_in1k_224_acc83.21.pth"
    assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.mean == (0.485, 0.456, 0.406)
    cfg = timm.models.get_pretrained_cfg("unireplknet_xl.in22k_ft_in1k_384")
    assert cfg.hf_hub_filename == "unireplknet_xl_in22k_to_in1k_384_acc87.96.pth"
    assert cfg.input_size == (3, 384, 384) and cfg.crop_pct == 1.0 and cfg.crop_mode == "squash"
    cfg = timm.models.get_pretrained_cfg("unireplknet_l.in22k")
    assert cfg.num_classes == 21841 and cfg.input_size == (3, 192, 192)
    assert len(timm.list_pretrained("unireplknet_*")) == 14


def _save(tmp_path, name: str, checkpoint: dict):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_training_checkpoint_loads_into_either_layout(tmp_path, ref):
    meta, tensors = ref
    path = _save(tmp_path, "unireplknet_small.pth", {"model": state_dict_of(tensors)})
    train = UniRepLKNet(**meta["constructor_kwargs"]).eval()
    load_checkpoint(train, path)
    _assert_matches(train, ref, merged=False)
    deploy = UniRepLKNet(**dict(meta["constructor_kwargs"], deploy=True)).eval()
    load_checkpoint(deploy, path)
    _assert_matches(deploy, ref, merged=True)


def test_deploy_checkpoint_reparameterizes_a_training_model(tmp_path, ref):
    meta, _ = ref
    model = UniRepLKNet(**meta["constructor_kwargs"]).eval()
    load_checkpoint(model, _save(tmp_path, "deploy.pth", _deploy_state(ref)))
    assert model.is_merged
    _assert_matches(model, ref, merged=True)


def test_22k_head_is_resized_and_headless_model_drops_it(tmp_path, small, ref):
    meta, tensors = ref
    state = small.state_dict()
    state["head.weight"], state["head.bias"] = torch.randn(21, 128), torch.randn(21)
    model = UniRepLKNet(**meta["constructor_kwargs"]).eval()
    load_checkpoint(model, _save(tmp_path, "in22k.pth", {"model": state}))
    assert model.head.out_features == 21
    assert_close_to_ref(_outputs(model, tensors["input"])[1], tensors["features"],
                        meta["suggested_tolerance"]["features"])
    headless = UniRepLKNet(**dict(meta["constructor_kwargs"], num_classes=0))
    assert not any(k.startswith("head.") for k in checkpoint_filter_fn({"model": state}, headless))


def test_timm_pretrained_path_uses_the_filter(tmp_path, small, ref):
    meta, _ = ref
    path = _save(tmp_path, "w.pth", {"model": small.state_dict()})
    kwargs = {k: meta["constructor_kwargs"][k] for k in ("depths", "dims", "kernel_sizes", "num_classes")}
    model = timm.create_model("unireplknet_t.in1k", pretrained=True, deploy=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kwargs).eval()
    _assert_matches(model, ref, merged=True)


def test_forward_intermediates_features_only_and_grn_probe_init(small, ref):
    _, tensors = ref
    x = tensors["input"]
    with torch.no_grad():
        final, intermediates = small.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in intermediates] == [(16, 24, 24), (32, 12, 12), (64, 6, 6), (128, 3, 3)]
        torch.testing.assert_close(final, small.forward_features(x), rtol=0, atol=0)
    kwargs = {k: load_meta(REF)["constructor_kwargs"][k] for k in ("depths", "dims", "kernel_sizes")}
    backbone = timm.create_model("unireplknet_t", features_only=True, out_indices=(0, 2), **kwargs).eval()
    with torch.no_grad():
        assert [tuple(f.shape) for f in backbone(x)] == [(2, 16, 24, 24), (2, 64, 6, 6)]
    grn = GRN(64)
    activate_branches(grn, seed=0)
    assert 0.3 < grn.gamma.std().item() < 0.7 and 0.05 < grn.beta.std().item() < 0.15


def test_gradient_checkpointing_gives_the_same_input_gradient(small, ref):
    _, tensors = ref
    grads = []
    for enable in (False, True):
        small.set_grad_checkpointing(enable)
        x = tensors["input"][:1].clone().requires_grad_(True)
        small.forward_features(x)[0, :, 1, 1].relu().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_measure_erf_fast_uses_the_deploy_conversion(small, ref):
    _, tensors = ref
    reference = measure_erf(small, tensors["input"], batch_size=2)
    fast = measure_erf(small, tensors["input"], batch_size=2, fast=True)
    assert fast.timing["engine"]["reparameterized"] and not small.is_merged
    assert abs(fast.map - reference.map).max() <= 1e-4 * abs(reference.map).max()
