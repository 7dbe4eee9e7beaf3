"""UniConvNet against the official code: reference forward passes (refs/uniconvnet_g8, _g16), the parameter layout
of all 13 released variants (manifests), the official init, checkpoint loading and the all-branches-active init."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import erf_tools.models.uniconvnet as uniconvnet_module
from erf_tools.layers.dcnv3 import DCNv3
from erf_tools.models.uniconvnet import UniConvNet
from erf_tools.weights import activate_branches, find_silenced_branches, load_checkpoint
from tests.conformance import (
    assert_close_to_ref,
    assert_matches_manifest,
    load_manifest,
    load_meta,
    load_tensors,
    state_dict_of,
)

VARIANTS = ["a", "p0", "p1", "p2", "n0", "n1", "n2", "n3", "t", "s", "b", "l", "xl"]


@pytest.fixture(scope="module")
def model_a() -> UniConvNet:
    torch.manual_seed(0)
    return timm.create_model("uniconvnet_a").eval()


def _small_a(**kwargs) -> UniConvNet:
    """The registered A variant (its cfg, group rule and widths) with one block per stage: cheap to build and save."""
    return timm.create_model("uniconvnet_a", depths=(1, 1, 1, 1), **kwargs)


def _skip_weight_init(monkeypatch) -> None:
    monkeypatch.setattr(uniconvnet_module, "_init_weights", lambda module: None)


@pytest.mark.parametrize("tag, group_channels", [("uniconvnet_g8", 8), ("uniconvnet_g16", 16)])
def test_reference_forward(tag, group_channels):
    meta = load_meta(f"refs/{tag}")
    tensors = load_tensors(f"refs/{tag}")
    assert meta["config_notes"]["dcn_channels_per_group"] == group_channels
    model = UniConvNet(**meta["constructor_kwargs"], dcn_group_channels=group_channels).eval()
    model.load_state_dict(state_dict_of(tensors), strict=True)
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    assert [k for k in model.state_dict()] == [k for k, _ in meta["state_dict"]]
    with torch.no_grad():
        logits = model(tensors["input"])
        features = model.forward_features(tensors["input"])
    tolerance = meta["suggested_tolerance"]
    assert features.shape == tensors["features"].shape
    assert_close_to_ref(logits, tensors["logits"], tolerance["logits"])
    assert_close_to_ref(features, tensors["features"], tolerance["features"])
    # the reference randomisation makes every branch live, DCN included
    assert find_silenced_branches(model) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifest_keys_shapes_and_param_count(variant, monkeypatch):
    """Every registered variant has the official keys, shapes, order and parameter count.

    Built on the meta device with the weight init skipped: only the layout is under test here (the init is tested
    on the real model A below), and this keeps the 227M-parameter XL to a fraction of a second.
    """
    _skip_weight_init(monkeypatch)
    with torch.device("meta"):
        model = timm.create_model(f"uniconvnet_{variant}")
    assert_matches_manifest(model, f"uniconvnet_{variant}")
    config = load_manifest(f"uniconvnet_{variant}")["config"]
    groups = [block.dcn.group for block in (stage[0] for stage in model.stages)]
    assert groups == config["dcn"]["groups_per_stage"]


def test_parameter_counts(model_a, monkeypatch):
    assert sum(p.numel() for p in model_a.parameters()) == 3_406_732
    _skip_weight_init(monkeypatch)
    with torch.device("meta"):
        assert sum(p.numel() for p in timm.create_model("uniconvnet_t").parameters()) == 30_325_652


def test_official_init(model_a):
    """Section 6 of the spec: trunc-normal 0.02 convs/linears, zero DCN offset/mask, Xavier DCN projections,
    layer scales 1e-6; so find_silenced_branches lists every layer scale and every DCN mask."""
    blocks = [block for stage in model_a.stages for block in stage]
    for block in blocks:
        for scale in (block.gamma1, block.gamma2, block.layer_scale):
            assert torch.all(scale == 1e-6)
        assert not block.dcn.offset.weight.any() and not block.dcn.offset.bias.any()
        assert not block.dcn.mask.weight.any() and not block.dcn.mask.bias.any()
        proj = block.dcn.input_proj.weight
        assert proj.abs().max() <= math.sqrt(6 / (2 * proj.shape[0]))
    fc1 = blocks[-1].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.05)
    assert not blocks[0].mlp.fc1.bias.any()
    silenced = find_silenced_branches(model_a)
    expected = {
        f"stages.{i}.{j}.{name}"
        for i, stage in enumerate(model_a.stages)
        for j in range(len(stage))
        for name in ("gamma1", "gamma2", "layer_scale", "dcn.mask.weight", "dcn.mask.bias")
    }
    assert set(silenced) == expected and len(silenced) == 5 * len(blocks)


def test_active_init_makes_every_branch_live():
    model = UniConvNet(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), num_classes=10, dcn_group_channels=16)
    activate_branches(model, seed=0)
    assert find_silenced_branches(model) == []
    outputs = []
    hook = model.stages[0][0].dcn.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model.forward_features(x)[0, :, 1, 1].sum().backward()
    hook.remove()
    assert outputs[0].abs().mean() > 0.1
    assert x.grad.abs().sum() > 0


def test_model_interface(model_a):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model_a.forward_features(x)
        logits = model_a(x)
        final, intermediates = model_a.forward_intermediates(x)
        pre_logits = model_a.forward_head(features, pre_logits=True)
    assert features.shape == (2, 192, 2, 2)
    assert logits.shape == (2, 1000)
    assert pre_logits.shape == (2, 192)
    assert [tuple(t.shape[1:]) for t in intermediates] == [(24, 16, 16), (48, 8, 8), (96, 4, 4), (192, 2, 2)]
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(logits, model_a.head(model_a.norm(features.mean((2, 3)))))
    assert [f["module"] for f in model_a.feature_info] == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert [f["reduction"] for f in model_a.feature_info] == [4, 8, 16, 32]
    assert UniConvNet.erf_target == "stages.3"
    assert model_a.get_submodule(UniConvNet.erf_target) is model_a.stages[3]


def test_features_only_and_reset_classifier():
    model = timm.create_model("uniconvnet_p0", depths=(1, 1, 1, 1), features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 8, 8), (1, 256, 2, 2)]
    assert model.feature_info.reduction() == [8, 32]
    classifier = timm.create_model("uniconvnet_p0", depths=(1, 1, 1, 1), num_classes=0)
    assert classifier(torch.randn(1, 3, 32, 32)).shape == (1, 256)
    classifier.reset_classifier(5)
    assert classifier(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_pretrained_cfgs():
    t = timm.models.get_pretrained_cfg("uniconvnet_t").to_dict()  # the default tag
    assert t["hf_hub_filename"] == "uniconvnet_t_1k_224_ema.pth"
    assert (t["input_size"], t["crop_pct"], t["interpolation"]) == ((3, 224, 224), 0.875, "bicubic")
    assert t["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and t["std"] == timm.data.IMAGENET_DEFAULT_STD
    cfgs = {name: timm.models.get_pretrained_cfg(name).to_dict() for name in timm.list_pretrained("uniconvnet_*")}
    assert len(cfgs) == 18
    t384 = cfgs["uniconvnet_t.in1k_384"]
    assert (t384["input_size"], t384["crop_pct"], t384["crop_mode"]) == ((3, 384, 384), 1.0, "squash")
    assert t384["hf_hub_filename"] == "uniconvnet_t_1k_384.pth"
    assert cfgs["uniconvnet_l.in22k"]["num_classes"] == 21841
    assert cfgs["uniconvnet_xl.in22k_ft_in1k_384"]["num_classes"] == 1000
    assert cfgs["uniconvnet_a.in1k"]["hf_hub_filename"] == "uniconvnet_a_1k_224.pth"


def _perturbed_state_dict(model: torch.nn.Module, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    state = {k: v + 0.5 for k, v in model.state_dict().items()}
    if num_classes is not None:
        state["head.weight"] = torch.randn(num_classes, state["head.weight"].shape[1])
        state["head.bias"] = torch.randn(num_classes)
    return state


def test_load_official_checkpoint_layout(tmp_path):
    model = _small_a()
    state = _perturbed_state_dict(model)
    path = tmp_path / "uniconvnet_a_1k_224.pth"
    torch.save({"model": state, "epoch": 299}, path)
    info = load_checkpoint(model, path, strict=True)
    assert info.source == "checkpoint"
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_ema_checkpoint(tmp_path):
    """The official factories read ``checkpoint['model']`` (also from ``*_ema`` files); EMA-only files load too."""
    model = _small_a()
    state, ema = _perturbed_state_dict(model), {k: v - 0.25 for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_ema": ema}, tmp_path / "both.pth")
    load_checkpoint(model, tmp_path / "both.pth")
    assert torch.equal(model.head.bias, state["head.bias"])
    torch.save({"model_ema": {f"module.{k}": v for k, v in ema.items()}}, tmp_path / "ema_only.pth")
    load_checkpoint(model, tmp_path / "ema_only.pth")
    assert torch.equal(model.head.bias, ema["head.bias"])


def test_load_22k_head(tmp_path):
    model = _small_a()
    state = _perturbed_state_dict(model, num_classes=21841)
    torch.save({"model": state}, tmp_path / "uniconvnet_a_22k_224.pth")
    load_checkpoint(model, tmp_path / "uniconvnet_a_22k_224.pth", strict=True)
    assert model.head.out_features == 21841 and model.num_classes == 21841
    assert torch.equal(model.head.weight, state["head.weight"])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 21841)


def test_headless_model_drops_checkpoint_head(tmp_path):
    model = _small_a(num_classes=0)
    torch.save({"model": _perturbed_state_dict(_small_a())}, tmp_path / "a.pth")
    load_checkpoint(model, tmp_path / "a.pth", strict=True)
    assert isinstance(model.head, torch.nn.Identity)


def test_group_rule_is_validated():
    with pytest.raises(ValueError, match="dcn_group_channels"):
        UniConvNet(dims=(24, 48, 96, 192), dcn_group_channels=16)
    groups = [(m.channels, m.group) for m in _small_a().modules() if isinstance(m, DCNv3)]
    assert groups == [(24, 3), (48, 6), (96, 12), (192, 24)]
