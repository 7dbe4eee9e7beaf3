"""The engine's exact fast paths: each one changes the maps by float rounding only, and only where it is safe.

BN folding, FFT depthwise convolutions, structural re-parameterisation and channels_last act on a private copy of the
model; early targets are computed on the window of the input that holds their receptive field; under fp16 the stem
and the stages at stride ≤ 8 stay float32, under bf16 the whole forward.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from erf_tools import measure_erf
from erf_tools.engine.engine import ERFEngine, frozen_eval
from erf_tools.engine.fastpaths import prepare_model
from erf_tools.layers.batchnorm import fold_batchnorm
from erf_tools.layers.fft_conv import use_fft_depthwise
from erf_tools.protocols import resolve_options
from erf_tools.targets import resolve_targets
from erf_tools.weights import activate_branches


def assert_close_maps(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


class Residual(nn.Module):
    """conv1 -> bn1 (foldable); conv2's output feeds bn2 *and* the residual sum (not foldable)."""

    erf_target = "out"

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        return self.out(torch.relu(self.bn2(z) + z))


def residual() -> nn.Module:
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
    return model


def test_fold_batchnorm_folds_only_exclusive_conv_bn_pairs():
    model = residual()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    folded = fold_batchnorm(model, x)
    assert folded == ["bn1"]  # conv2's output is also read by the residual sum
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert fold_batchnorm(residual(), x, exclude=["conv1"]) == []  # a target conv keeps its own output


def test_fft_depthwise_replaces_only_large_same_padded_depthwise_convs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 13, padding=6, groups=4), nn.Conv2d(4, 4, 5, padding=2, groups=4),
                          nn.Conv2d(4, 4, 13, padding=6), nn.Conv2d(4, 4, 13, padding=6, groups=4, stride=2))
    x = torch.randn(2, 4, 40, 40, requires_grad=True)
    expected = model(x)
    (expected_grad,) = torch.autograd.grad(expected[:, :, 5, 5].sum(), x)
    assert use_fft_depthwise(model, 11) == ["0"]
    out = model(x)
    (grad,) = torch.autograd.grad(out[:, :, 5, 5].sum(), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_prepare_model_leaves_the_callers_model_alone():
    model = residual()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    work, info = prepare_model(model, resolve_targets(model, None), (16, 16), fold_bn=True, channels_last=True)
    assert work is not model and info == {"folded_batchnorms": 1}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert prepare_model(model, resolve_targets(model, None), (16, 16))[0] is model


def test_fast_paths_change_the_map_by_rounding_only():
    model = residual()
    images = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    reference = measure_erf(model, images, batch_size=3)
    fast = measure_erf(model, images, batch_size=3, fold_bn=True, channels_last=True)
    assert_close_maps(fast.map, reference.map)
    assert fast.timing["engine"]["folded_batchnorms"] == 1 and fast.timing["engine"]["channels_last"]


def test_reparameterize_replknet():
    from erf_tools.models.replknet import RepLKNet

    torch.manual_seed(0)
    model = RepLKNet(large_kernel_sizes=(13, 11, 9, 7), layers=(1, 1, 1, 1), channels=(8, 16, 16, 16),
                     small_kernel=5, num_classes=10).eval()
    activate_branches(model, seed=0)
    images = torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    targets = ["stage:0", "stage:3"]
    reference = measure_erf(model, images, batch_size=2, targets=targets)
    merged = measure_erf(model, images, batch_size=2, targets=targets, reparameterize=True, fft_depthwise=9)
    engine = merged[0].timing["engine"]
    assert engine["reparameterized"] and engine["fft_depthwise_convs"] == 3
    # FFT convolutions count as local: the stage-0 field (a 13-px kernel at stride 4) is computed on its window
    assert engine["windowed_targets"] == ["stages.0"]
    assert not model.is_merged  # the caller's model keeps its training-time structure
    for fast, slow in zip(merged, reference):
        assert_close_maps(fast.map, slow.map, rel=1e-4)
    with pytest.warns(UserWarning, match="no structural_reparam"):
        measure_erf(residual(), images[:1], reparameterize=True)


# --- early targets on their receptive-field window --------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return activate_branches(timm.create_model("resnet18", pretrained=False), seed=1).eval()


def _engine(model, targets, **kwargs) -> ERFEngine:
    return ERFEngine(model, resolve_targets(model, targets), resolve_options("replknet"), "cpu", "fp32", False,
                   **kwargs)


def test_early_targets_use_their_window_and_give_the_same_maps(resnet):
    images = torch.randn(4, 3, 192, 192, generator=torch.Generator().manual_seed(2))
    targets = ["layer1", "layer2", "layer4"]
    cropped, full = _engine(resnet, targets), _engine(resnet, targets, crop_early_targets=False)
    with frozen_eval(resnet):
        first = [cropped.process(images[:2]), full.process(images[:2])]  # first batch: full pass + window check
        second = [cropped.process(images[2:]), full.process(images[2:])]  # then the windows
    assert set(cropped.crops) == {"layer1", "layer2"} and not full.crops
    window = cropped.crops["layer1"]
    assert window.height * window.width < 0.1 * 192 * 192
    for maps in (first, second):
        for name in targets:
            assert_close_maps(maps[0][name].numpy(), maps[1][name].numpy())
    assert not second[0]["layer1"][:, :window.top].any()  # nothing outside the field


def test_a_single_early_target_skips_the_full_pass(resnet):
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    cropped = measure_erf(resnet, images, targets="layer1", batch_size=2)
    engine = _engine(resnet, "layer1", crop_early_targets=False)
    with frozen_eval(resnet):
        full = torch.cat([engine.process(images[:2])["layer1"], engine.process(images[2:])["layer1"]])
    assert_close_maps(cropped.map, full.double().mean(0).numpy())


class Squeeze(nn.Module):
    """A global average (squeeze-excitation): the centre unit then depends on every pixel; never cropped."""

    erf_target = "tail"

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.head(x)
        return self.tail(y * torch.sigmoid(y.mean((2, 3), keepdim=True)))


def test_targets_behind_global_operators_are_not_cropped():
    torch.manual_seed(0)
    model = Squeeze().eval()
    engine = _engine(model, ["head", "tail"])
    with frozen_eval(model):
        engine.process(torch.randn(2, 3, 64, 64))
    assert "tail" not in engine.crops


# --- reduced precision ------------------------------------------------------------------------------------------


def _output_dtypes(layers: dict[str, nn.Module], run) -> dict[str, torch.dtype]:
    """The dtype of each layer's first output during ``run()`` (run with ``fast=False``: the hooks then record the
    caller's module itself; a fast-path copy carries them too and also runs the BN-folding probe in float32)."""
    dtypes = {}
    hooks = [m.register_forward_hook(lambda m, a, o, key=key: dtypes.setdefault(key, o.dtype) and None)
             for key, m in layers.items()]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return dtypes


def _stage_convs(resnet) -> dict[str, nn.Module]:
    return {"stem": resnet.conv1, "stride 4": resnet.layer1[0].conv1, "stride 8": resnet.layer2[0].conv1,
            "stride 16": resnet.layer3[0].conv1, "stride 32": resnet.layer4[1].conv2}


def test_fp16_keeps_the_stem_and_the_stages_at_stride_8_in_float32(resnet):
    results = []
    dtypes = _output_dtypes(_stage_convs(resnet), lambda: results.extend([
        measure_erf(resnet, torch.randn(2, 3, 64, 64), precision="fp16", fast=False),
        measure_erf(resnet, torch.randn(2, 3, 64, 64), precision="fp16", targets="layer1", fast=False)]))
    assert dtypes == {"stem": torch.float32, "stride 4": torch.float32, "stride 8": torch.float32,
                      "stride 16": torch.float16, "stride 32": torch.float16}
    assert not torch.is_autocast_enabled("cpu")  # the switch is undone, also after a forward that stopped early
    for r in results:
        assert np.isfinite(r.map).all() and r.map.any()


class Plain(nn.Module):
    """No timm feature_info: only the convolution that reads the input stays float32."""

    erf_target = "second"

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_fp16_without_stages_keeps_only_the_stem_in_float32():
    model = Plain().eval()
    dtypes = _output_dtypes({"first": model.first, "second": model.second}, lambda: measure_erf(
        model, torch.randn(1, 3, 32, 32), precision="fp16", protocol="luo2016", input_size=None, fast=False))
    assert dtypes == {"first": torch.float32, "second": torch.float16}


def test_bf16_runs_the_forward_in_float32_and_the_input_gradients_in_bf16(resnet):
    """precision="bf16": every layer's output is float32 (the forward is that of fp32), and the convolutions'
    backward nodes are the bf16 input-gradient ones."""
    nodes = []
    handle = resnet.conv1.register_forward_hook(lambda m, a, o: nodes.append(o.grad_fn.name()) and None)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = []
    try:
        dtypes = _output_dtypes(_stage_convs(resnet), lambda: results.extend([
            measure_erf(resnet, images, precision="bf16", fast=False), measure_erf(resnet, images, fast=False)]))
    finally:
        handle.remove()
    assert set(dtypes.values()) == {torch.float32}
    assert nodes[0] == "_Conv2dBf16InputGradientBackward" and nodes[-1] == "ConvolutionBackward0"
    bf16, fp32 = (r.map for r in results)
    assert 0 < np.abs(bf16 - fp32).max() <= 1e-2 * fp32.max()  # bf16 products in the backward pass: not exact


def test_bf16_map_keeps_pearson_0999_to_the_fp32_map():
    """resnet50 (active init) @64, 4 noise images, Kim et al. protocol. Measured: Pearson 0.99997 to the fp32
    map; bf16 autocast with the stride ≤ 8 stages in float32 (the bf16 policy before issue 18 item 4) gave 0.99689:
    a bf16 forward rounds the weights and activations, and the map follows the forward's rounding
    (:mod:`erf_tools.engine.bf16_backward`)."""
    model = activate_branches(timm.create_model("resnet50", pretrained=False), seed=0).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(protocol="kim2023", input_size=None, batch_size=4)
    fp32, bf16 = (measure_erf(model, images, precision=p, **kwargs).map for p in ("fp32", "bf16"))
    assert np.corrcoef(bf16.ravel(), fp32.ravel())[0, 1] >= 0.999


class Spread(nn.Module):
    """Three 31×31 averaging convolutions and a 1×1 gain: the gradient is spread over a 91×91 field whose tails
    (with gain 1e-3: 1e-12..1e-9 per pixel, as in 1024² ERFs) lie below float16's smallest subnormal; gain 2e3
    makes the backward pass overflow float16 instead."""

    erf_target = "out"

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Conv2d(3, 3, 31, padding=15, groups=3, bias=False) for _ in range(3)])
        for conv in self.body:
            nn.init.constant_(conv.weight, 1 / 961)
        self.out = nn.Conv2d(3, 3, 1, bias=False)
        nn.init.constant_(self.out.weight, gain)

    def forward(self, x):
        return self.out(self.body(x))


@pytest.mark.parametrize("gain", [1e-3, 2e3])
def test_fp16_gradients_are_scaled_against_underflow_and_backed_off_on_overflow(gain):
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) + 0.5
    # fast=False: direct 31×31 convolutions keep the field's support exact (FFTs spread ~1e-7 rounding everywhere)
    kwargs = dict(protocol="luo2016", input_size=None, fast=False)
    reference = measure_erf(Spread(gain), images, **kwargs).map
    half = measure_erf(Spread(gain), images, precision="fp16", **kwargs).map

    def l1_error(m: np.ndarray) -> float:
        return float(np.abs(m - reference).sum() / np.abs(reference).sum())

    assert np.isfinite(half).all() and np.count_nonzero(half) == np.count_nonzero(reference) == 91 * 91
    assert l1_error(half) < 0.05  # CPU float16 kernels accumulate in float16: a few percent


def test_fp16_objective_scale_keeps_gradients_that_float16_flushes_to_zero():
    """The scale itself: a gradient of 1e-8 made in float16 (below its smallest subnormal, 6e-8) is 0 without the
    scale and exact with it. (The model-level control of this used oneDNN's float16 convolutions, which the engine
    no longer uses on CPUs: see ``ERFEngine._autocast``.)"""
    model = Spread(1.0)
    engine = ERFEngine(model, resolve_targets(model, None), resolve_options("luo2016"), "cpu", "fp16", False)
    x = torch.ones(1, 3, 4, 4, requires_grad=True)

    def objective() -> torch.Tensor:
        tiny = torch.tensor(1e-4, dtype=torch.float16)
        return ((x.half() * tiny) * tiny).float().sum()

    scaled = engine._input_gradient(objective(), x, retain_graph=False)
    assert torch.allclose(scaled, torch.full_like(x, 1e-8), rtol=1e-2)
    engine.grad_scale = 1.0
    assert not engine._input_gradient(objective(), x, retain_graph=False).any()


def test_exact_fast_paths_apply_reparameterisation_only_where_the_model_has_it(resnet):
    from erf_tools.engine.fastpaths import exact_fast_paths
    from erf_tools.layers.fft_conv import FFT_DEPTHWISE_MIN_KERNEL

    class Reparameterisable(nn.Module):
        def structural_reparam(self) -> None:
            pass

    assert exact_fast_paths(resnet) == {"channels_last": True, "fold_bn": True, "reparameterize": False,
                                        "fft_depthwise": FFT_DEPTHWISE_MIN_KERNEL}
    assert exact_fast_paths(Reparameterisable())["reparameterize"] is True
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    plain, fast = measure_erf(resnet, images, fast=False), measure_erf(resnet, images)  # fast paths: the default
    assert fast.timing["engine"]["channels_last"] and fast.timing["engine"]["folded_batchnorms"] == 20
    assert np.abs(fast.map - plain.map).max() <= 1e-5 * plain.map.max()


class MergesItsBranch(nn.Module):
    """``structural_reparam()`` folds ``branch`` into ``conv`` and deletes it, as RepLKNet deletes its small kernels."""

    erf_target = "conv"

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.branch = nn.Conv2d(3, 4, 5, padding=2), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) + self.branch(x) if hasattr(self, "branch") else self.conv(x)

    def structural_reparam(self) -> None:
        with torch.no_grad():
            self.conv.weight[:, :, 2, 2] += self.branch.weight[:, :, 0, 0]
            self.conv.bias += self.branch.bias
        del self.branch


def test_default_fast_paths_skip_a_reparameterisation_that_would_remove_the_target():
    from erf_tools.engine.fastpaths import TargetRemovedError

    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    merged = measure_erf(MergesItsBranch().eval(), images, protocol="luo2016", input_size=None)
    assert merged.timing["engine"].get("reparameterized") is True  # the default target survives: re-parameterised
    model = MergesItsBranch().eval()
    kept = measure_erf(model, images, targets="branch", protocol="luo2016", input_size=None)
    engine = kept.timing["engine"]
    assert engine["reparameterized"] is False and "remove a target" in engine["reparameterize_skipped"]
    plain = measure_erf(model, images, targets="branch", protocol="luo2016", input_size=None, fast=False)
    assert np.abs(kept.map - plain.map).max() <= 1e-6 * np.abs(plain.map).max()
    with pytest.raises(TargetRemovedError, match="branch"):  # asked for explicitly: an error, not a silent skip
        measure_erf(model, images, targets="branch", protocol="luo2016", input_size=None, reparameterize=True)
