"""The extraction engine: exact parity with the published protocols, batching, targets, analytic answers."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import timm
import torch
from torch import nn

import erf_tools
from erf_tools import measure_erf
from erf_tools.engine.accumulate import ERFAccumulator
from erf_tools.engine.objective import centre_objective, per_sample_maps
from erf_tools.protocols import resolve_options
from erf_tools.targets import TargetError
from erf_tools.weights import RandomInitWarning, activate_branches
from tests.conformance import load_meta, load_tensors, state_dict_of


def kim_fixture_model() -> nn.Module:
    model = timm.create_model("test_resnet", pretrained=False)
    model.load_state_dict(state_dict_of(load_tensors("erf/kim2023_protocol")), strict=True)
    return model.eval()


def replknet_fixture_model() -> nn.Module:
    from erf_tools.models.replknet import RepLKNet

    kwargs = dict(load_meta("refs/replknet_small")["constructor_kwargs"])
    model = RepLKNet(**kwargs)
    model.load_state_dict(state_dict_of(load_tensors("refs/replknet_small")), strict=True)
    return model.eval()


def assert_relative_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    """max |actual - expected| <= rel · max |expected|: float32 rounding differs between batch sizes."""
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


# --- exact parity with the official protocol code -------------------------------------------------------------


def test_kim2023_matches_openerf_fixture():
    tensors = load_tensors("erf/kim2023_protocol")
    tol = load_meta("erf/kim2023_protocol")["suggested_tolerance"]
    result = measure_erf(kim_fixture_model(), tensors["inputs"], protocol="kim2023", targets="layer4", batch_size=3)
    per_image = torch.from_numpy(result.per_image_maps.astype(np.float64))
    torch.testing.assert_close(per_image, tensors["per_image_maps"].double(), **tol["per_image_maps"])
    torch.testing.assert_close(torch.from_numpy(result.map), tensors["erf_map"].double(), **tol["erf_map"])
    assert result.map.sum() == pytest.approx(1.0, abs=1e-12)
    assert result.centre_unit == (1, 1) and result.num_images == 4 and result.num_rejected == 0


def test_replknet_matches_official_fixture():
    pytest.importorskip("erf_tools.models.replknet").RepLKNet  # noqa: B018
    tensors = load_tensors("erf/replknet_protocol")
    tol = load_meta("erf/replknet_protocol")["suggested_tolerance"]["per_image_maps_and_mean_map"]
    model = replknet_fixture_model()
    result = measure_erf(model, tensors["inputs"], protocol="replknet", batch_size=4)
    assert result.target == model.erf_target and result.centre_unit == (2, 2)
    per_image = torch.from_numpy(result.per_image_maps.astype(np.float64))
    torch.testing.assert_close(per_image, tensors["per_image_maps"].double(), **tol)
    torch.testing.assert_close(torch.from_numpy(result.map), tensors["mean_map"].double(), **tol)


# --- batching and several targets are exact -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def active_resnet() -> nn.Module:
    torch.manual_seed(0)
    return activate_branches(timm.create_model("resnet18", pretrained=False), seed=1).eval()


@pytest.mark.parametrize("protocol", ["replknet", "kim2023", "luo2016"])
def test_batch_of_16_equals_16_single_image_runs(active_resnet, protocol):
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    batched = measure_erf(active_resnet, images, protocol=protocol, batch_size=16)
    single = measure_erf(active_resnet, images, protocol=protocol, batch_size=1)
    assert_relative_close(batched.map, single.map)
    assert_relative_close(batched.per_image_maps, single.per_image_maps)


def test_several_targets_from_one_pass_equal_separate_runs(active_resnet):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    names = ["layer1", "stage:2", "layer4"]
    together = measure_erf(active_resnet, images, targets=names, batch_size=4)
    assert [r.target for r in together] == ["layer1", "layer3", "layer4"]
    for result, name in zip(together, names):
        alone = measure_erf(active_resnet, images, targets=name, batch_size=2)
        assert_relative_close(result.map, alone.map)


def test_batched_vjp_of_several_targets_equals_one_backward_per_target(active_resnet):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    names = ["layer1", "layer2", "layer3", "layer4"]
    sequential = measure_erf(active_resnet, images, targets=names, batch_size=2)
    batched = measure_erf(active_resnet, images, targets=names, batch_size=2, batched_vjp=True)
    for one, other in zip(sequential, batched):
        assert_relative_close(other.map, one.map)
        assert_relative_close(other.per_image_maps, one.per_image_maps)


def test_same_seed_and_images_give_identical_maps(active_resnet):
    first = measure_erf(active_resnet, "noise", num_images=3, input_size=64, seed=3)
    second = measure_erf(active_resnet, "noise", num_images=3, input_size=64, seed=3)
    other = measure_erf(active_resnet, "noise", num_images=3, input_size=64, seed=4)
    assert np.array_equal(first.map, second.map)
    assert not np.array_equal(first.map, other.map)


def test_no_parameter_gradients_and_state_restored(active_resnet):
    active_resnet.train()
    measure_erf(active_resnet, torch.randn(2, 3, 32, 32), batch_size=2)
    assert active_resnet.training
    assert all(p.grad is None for p in active_resnet.parameters())
    assert all(p.requires_grad for p in active_resnet.parameters())
    active_resnet.eval()


# --- analytic: a linear stack of box filters ---------------------------------------------------------------------


class BoxStack(nn.Module):
    """n depthwise k×k all-ones convolutions, stride 1, 'same' padding: the ERF is the n-fold box autoconvolution."""

    def __init__(self, n: int, k: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Conv2d(3, 3, k, padding=k // 2, groups=3, bias=False) for _ in range(n)])
        for conv in self.layers:
            nn.init.ones_(conv.weight)
        self.erf_target = "layers"

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("n,k", [(4, 3), (6, 5), (3, 7)])
def test_linear_box_stack_gives_box_autoconvolution(n, k):
    size = 2 * n * (k // 2) + 9
    result = measure_erf(BoxStack(n, k), torch.randn(2, 3, size, size), protocol="luo2016", batch_size=2)
    box = np.ones(k)
    profile = np.array([1.0])
    for _ in range(n):
        profile = np.convolve(profile, box)
    expected = np.zeros((size, size))
    centre, half = size // 2, len(profile) // 2
    expected[centre - half: centre + half + 1, centre - half: centre + half + 1] = 3 * np.outer(profile, profile)
    np.testing.assert_allclose(result.map, expected, rtol=1e-6)
    weights = result.map.sum(axis=0) / result.map.sum()
    coords = np.arange(size)
    mean = (weights * coords).sum()
    variance = (weights * (coords - mean) ** 2).sum()
    assert mean == pytest.approx(centre)
    assert variance == pytest.approx(n * (k * k - 1) / 12, rel=1e-9)
    assert result.receptive_field_centre == (centre, centre)


# --- options, NaN handling, targets ------------------------------------------------------------------------------


def test_per_sample_sign_is_applied_before_the_image_sum():
    gradient = torch.tensor([[[[1.0, -2.0]], [[-3.0, 1.0]], [[0.5, 0.5]]]])  # 1×3×1×2
    replknet = per_sample_maps(gradient, resolve_options("replknet"))
    kim = per_sample_maps(gradient, resolve_options("kim2023"))
    luo = per_sample_maps(gradient, resolve_options("luo2016"))
    torch.testing.assert_close(replknet, torch.tensor([[[1.5, 1.5]]]))
    torch.testing.assert_close(kim, torch.tensor([[[0.0, 0.0]]]))  # mean(1,-3,.5) < 0 and mean(-2,1,.5) < 0
    torch.testing.assert_close(luo, torch.tensor([[[4.5, 3.5]]]))


def test_centre_objective_reductions():
    features = torch.tensor([[[[0.0, 2.0]], [[0.0, -4.0]]]])  # 1×2×1×2, centre (0, 1)
    assert centre_objective(features, (0, 1), resolve_options("replknet")).item() == 2.0
    assert centre_objective(features, (0, 1), resolve_options("kim2023")).item() == -1.0
    assert centre_objective(features, (0, 1), resolve_options("luo2016", channels=[1])).item() == -4.0


def test_options_are_recorded_and_validated(active_resnet):
    result = measure_erf(active_resnet, torch.randn(1, 3, 32, 32), gradient="abs", centre=(0, 0))
    assert result.options["gradient"] == "abs" and tuple(result.options["centre"]) == (0, 0)
    assert result.centre_unit == (0, 0)
    with pytest.raises(TypeError, match="unknown ERF option.*gradiant"):
        measure_erf(active_resnet, torch.randn(1, 3, 32, 32), gradiant="abs")
    with pytest.raises(ValueError, match="gradient='sqrt'"):
        measure_erf(active_resnet, torch.randn(1, 3, 32, 32), gradient="sqrt")
    with pytest.raises(ValueError, match="unknown protocol"):
        measure_erf(active_resnet, torch.randn(1, 3, 32, 32), protocol="ding")


class NaNOnSecondImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.erf_target = "conv"

    def forward(self, x):
        scale = torch.ones(x.shape[0], 1, 1, 1)
        scale[1] = float("nan")
        return self.conv(x * scale)


def test_nan_images_are_counted_and_left_out():
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="1 image.*NaN/Inf"):
        result = measure_erf(NaNOnSecondImage(), images, batch_size=3)
    assert result.num_images == 2 and result.num_rejected == 1 and result.rejected_images == ["tensor[1]"]
    assert np.isfinite(result.map).all()
    assert result.per_image_maps.shape[0] == 2


def test_accumulator_mean_over_valid_images_only():
    accumulator = ERFAccumulator((1, 2))
    accumulator.add(torch.tensor([[[1.0, 2.0]], [[float("inf"), 0.0]], [[3.0, 4.0]]]), ["a", "b", "c"])
    np.testing.assert_array_equal(accumulator.finalize(resolve_options("replknet")), [[2.0, 3.0]])
    assert accumulator.rejected == ["b"] and accumulator.count == 2


def test_unknown_target_suggests_close_names(active_resnet):
    with pytest.raises(TargetError, match="did you mean 'layer4'"):
        measure_erf(active_resnet, torch.randn(1, 3, 32, 32), targets="layer5")
    with pytest.raises(TargetError, match="no spatial feature map"):
        measure_erf(active_resnet, torch.randn(1, 3, 32, 32), targets="global_pool")


def test_vit_tokens_become_a_grid_without_prefix_tokens():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=64)
    # The channel mean of a default LayerNorm output (weight 1, bias 0) is identically 0: Kim's objective is blind.
    with pytest.warns(UserWarning, match="zero everywhere"):
        blind = measure_erf(model, torch.randn(1, 3, 64, 64), protocol="kim2023")
    assert blind.timing["engine"]["blind_targets"] == ["norm"]
    activate_branches(model, seed=0)
    result = measure_erf(model, torch.randn(2, 3, 64, 64), protocol="kim2023")
    patch = model.patch_embed.patch_size[0]
    assert result.target == "norm"
    assert result.feature_shape[1:] == (64 // patch, 64 // patch)
    assert result.map.shape == (64, 64) and result.map.sum() == pytest.approx(1.0)
    unit = result.centre_unit
    assert result.receptive_field_centre == ((patch - 1) / 2 + unit[0] * patch, (patch - 1) / 2 + unit[1] * patch)


def test_swin_nhwc_output_is_permuted():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1),
                              embed_dim=16, num_heads=(1, 1, 1, 1))
    result = measure_erf(model, torch.randn(1, 3, 224, 224), targets="stage:3", protocol="kim2023")
    assert result.feature_shape == (128, 7, 7)
    assert result.total_stride == (32.0, 32.0)
    # patchify 4×4/s4 and 2×2 merges: the centre unit 3 sits at 1.5 + 0.5·4 + 1·8 + 2·16 ... = 111.5
    assert result.receptive_field_centre == (111.5, 111.5)


def test_padded_cnn_receptive_field_centre(active_resnet):
    result = measure_erf(active_resnet, torch.randn(1, 3, 224, 224))
    assert result.centre_unit == (3, 3) and result.total_stride == (32.0, 32.0)
    assert result.receptive_field_centre == (96.0, 96.0)  # not the image centre 111.5 (erf-protocols.md §8)


# --- weights --------------------------------------------------------------------------------------------------


def test_silenced_branches_warn_and_active_init_does_not():
    with pytest.warns(RandomInitWarning, match="silenced residual-branch"):
        result = measure_erf("resnet18", torch.randn(1, 3, 32, 32))
    assert result.weights["source"] == "random" and result.weights["silenced_branches"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        active = measure_erf("resnet18", torch.randn(1, 3, 32, 32), weights="active", seed=2)
    assert {k: active.weights[k] for k in ("source", "init_mode", "path", "tag", "seed", "silenced_branches")} == {
        "source": "active", "init_mode": "active", "path": None, "tag": None, "seed": 2, "silenced_branches": []}


def test_active_init_widens_the_random_init_erf():
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        silenced = measure_erf("resnet18", images)
    active = measure_erf("resnet18", images, weights="active")

    def spread(m):
        p = m / m.sum()
        y, x = np.indices(m.shape)
        return math.sqrt((p * ((y - (p * y).sum()) ** 2 + (x - (p * x).sum()) ** 2)).sum())

    assert spread(active.map) > 1.3 * spread(silenced.map)


def test_exported_api():
    for name in erf_tools.__all__:
        assert hasattr(erf_tools, name)


def test_module_active_init_runs_after_the_generic_rules():
    class Special(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def active_init_(self, generator: torch.Generator) -> None:
            self.inner.weight.data.fill_(7.0)

    model = nn.Sequential(Special(), nn.Conv2d(3, 3, 1))
    activate_branches(model, seed=0)
    assert torch.all(model[0].inner.weight == 7.0)  # not overwritten by the fan-in draw of its child
    assert model[0].inner.bias.abs().max() > 0
