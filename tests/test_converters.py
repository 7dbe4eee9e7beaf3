"""Checkpoint-layout converters: each registered layout converts into a model that computes the same function, is
recognised from its keys and recorded; unknown layouts get a diagnosis and the full key lists; a refused checkpoint
leaves no progress bar and no output folder behind."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from typer.testing import CliRunner

from erf_tools import converters
from erf_tools.cli.app import app
from erf_tools.converters import Converter, alignment, find_converter, register_converter
from erf_tools.weights import CheckpointError, activate_branches, load_checkpoint, load_model


def _same_function(ours: torch.nn.Module, theirs: torch.nn.Module, size: int) -> float:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs.eval()(x)
        return float((ours.eval()(x) - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("timm_name, torchvision_name, layout, size", [
    ("convnext_tiny", "convnext_tiny", "torchvision-convnext", 64),
    ("swin_tiny_patch4_window7_224", "swin_t", "torchvision-swin", 224),
    ("efficientnet_b0", "efficientnet_b0", "torchvision-efficientnet", 64),
])
def test_torchvision_checkpoints_load_into_timm(tmp_path, timm_name, torchvision_name, layout, size):
    source = getattr(torchvision.models, torchvision_name)()
    activate_branches(source, seed=1)  # non-trivial values everywhere, so a wrong mapping shows in the outputs
    path = tmp_path / f"{torchvision_name}.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model(timm_name, pretrained=False)
    info = load_checkpoint(model, path)
    assert info.layout == layout and info.converter == layout
    assert _same_function(model, source, size) < 1e-5


def test_torchvision_resnet_is_native(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18-tv.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model("resnet18", pretrained=False)
    info = load_checkpoint(model, path)
    assert info.layout == "native" and info.converter is None


def _tiny_replknet(**extra):
    return timm.create_model("replknet_31b", large_kernel_sizes=(7, 7, 5, 5), layers=(1, 1, 1, 1), small_kernel=3,
                             channels=(8, 16, 32, 64), **extra)


def _as_mmpretrain(state: dict) -> dict:
    """Our RepLKNet keys in mmpretrain's layout (mmpretrain/models/backbones/replknet.py + LinearClsHead)."""
    out = {}
    for key, value in state.items():
        if key.startswith("norm."):
            out["backbone.stages.3.norm." + key[len("norm."):]] = value
        elif key.startswith("head."):
            out["head.fc." + key[len("head."):]] = value
        else:
            out["backbone." + key] = value
    out["backbone.stages.0.norm.weight"] = torch.ones(8)  # an intermediate-stage norm (dense heads only)
    return out


@pytest.mark.parametrize("merged", [False, True])
def test_mmpretrain_replknet_loads_into_ours(tmp_path, merged):
    torch.manual_seed(0)
    reference = _tiny_replknet()
    activate_branches(reference, seed=2)
    if merged:  # mmpretrain's deploy checkpoints hold the re-parameterised kernels (lkb_reparam)
        reference.structural_reparam()
    path = tmp_path / "replknet-31B_3rdparty_in1k.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": _as_mmpretrain(reference.state_dict())}, path)
    model = _tiny_replknet()
    info = load_checkpoint(model, path)
    assert info.converter == "mmpretrain-replknet"
    assert _same_function(model, reference, 64) < 1e-5


def test_lukemelas_layout_into_the_wrong_variant_says_so(tmp_path):
    model = timm.create_model("test_efficientnet", pretrained=False)
    fake = {"_conv_stem.weight": torch.zeros(1), "_blocks.0._depthwise_conv.weight": torch.zeros(1),
            "_blocks.99._project_conv.weight": torch.zeros(1)}
    path = tmp_path / "efficientnet-b0.pth"
    torch.save(fake, path)
    with pytest.warns(converters.LayoutWarning, match="TensorFlow ports"), \
            pytest.raises(CheckpointError, match=r"does not fit test_efficientnet: checkpoint block 99 does not exist"):
        load_checkpoint(model, path)


def test_renamed_keys_are_diagnosed_as_a_naming_mismatch_with_full_lists(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "renamed.pth"
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(model, path)
    message = str(caught.value)
    count = len(model.state_dict())
    assert f"all {count} tensors line up one-to-one in order" in message
    assert "register a converter" in message and "register_converter" in message
    report = caught.value.report_path
    assert report is not None and str(report) in message
    listed = report.read_text()
    assert all(k in listed for k in model.state_dict()) and "net.fc.weight" in listed
    assert caught.value.details == listed


def test_other_architecture_is_not_called_a_naming_mismatch(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(timm.create_model("test_resnet"), path)
    assert "do not line up" in str(caught.value) and "register a converter" not in str(caught.value)


def test_alignment_sees_reordered_shapes():
    a = {"x": torch.zeros(2), "y": torch.zeros(3)}
    assert alignment(a, {"p": torch.zeros(2), "q": torch.zeros(3)}).aligned_in_order
    swapped = alignment(a, {"p": torch.zeros(3), "q": torch.zeros(2)})
    assert not swapped.aligned_in_order and swapped.same_shapes and swapped.first_difference == 0


def test_a_registered_converter_is_applied_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(converters, "CONVERTERS", dict(converters.CONVERTERS))
    register_converter(Converter(
        name="net-prefix", source="a trainer that prefixes net.", target="timm test_resnet",
        recognise=lambda keys: all(k.startswith("net.") for k in keys),
        applies_to=lambda model: type(model).__name__ == "ResNet",
        convert=lambda state, model: {k[len("net."):]: v for k, v in state.items()}))
    with pytest.raises(ValueError, match="already registered"):
        register_converter(converters.CONVERTERS["net-prefix"])
    source, _ = load_model("test_resnet", "active", seed=4)
    path = tmp_path / "prefixed.pth"
    torch.save({f"net.{k}": v for k, v in source.state_dict().items()}, path)
    model, info = load_model("test_resnet", str(path))
    assert info.converter == "net-prefix" and info.layout == "net-prefix"
    assert find_converter(torch.load(path, weights_only=True), model).name == "net-prefix"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_refused_checkpoint_prints_no_bar_and_leaves_no_folder(tmp_path):
    path = tmp_path / "renamed.pth"
    torch.save({f"net.{k}": v for k, v in timm.create_model("test_resnet").state_dict().items()}, path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["measure", "-m", "test_resnet", "-w", str(path), "-o", str(out),
                                      "--size", "64", "-n", "1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "line up one-to-one in order" in text
    assert "0/1" not in text and not out.exists()
    debug = CliRunner().invoke(app, ["--debug", "measure", "-m", "test_resnet", "-w", str(path), "-o", str(out),
                                     "--size", "64", "-n", "1"])
    assert isinstance(debug.exception, CheckpointError)
    assert "model tensors in order" in debug.output and "net.conv1.0.weight" in debug.output


def test_timm_pretrained_loads_an_mmpretrain_file_through_the_family_filter(tmp_path):
    torch.manual_seed(0)
    reference = _tiny_replknet()
    activate_branches(reference, seed=5)
    path = tmp_path / "replknet-31B_3rdparty_in1k.pth"
    torch.save({"state_dict": _as_mmpretrain(reference.state_dict())}, path)
    model = _tiny_replknet(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert _same_function(model, reference, 64) < 1e-5
