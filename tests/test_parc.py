"""ParC operator and ParC networks against the official code (conformance fixtures) and against the ParC math."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import erf_tools.models  # noqa: F401  (registers the models with timm)
from erf_tools.layers.parc import FFT_MIN_LENGTH, CircularCorrelationFFT, ParC, parc_kernel, set_parc_path
from erf_tools.models.parc import ParCConvNeXt, ParCResNet, checkpoint_filter_fn
from erf_tools.weights import activate_branches, find_silenced_branches, load_checkpoint
from tests.conformance import assert_close_to_ref, assert_matches_manifest, load_meta, load_tensors, state_dict_of

REFS = {"refs/parc_convnext_small": ParCConvNeXt, "refs/parc_resnet50_small": ParCResNet}


def circular_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pe, direction: str, dense: bool):
    """The ParC definition by its index formula: y[o,i] = b[o] + Σ_c Σ_k w[o,c,k] · (x + pe)[c, (i+k) mod L]."""
    axis = 2 if direction == "H" else 3
    x = x if pe is None else x + pe
    w = weight.flatten(2)  # (C_out, C_in/groups, L)
    y = torch.zeros_like(x) if not dense else x.new_zeros(x.shape[0], w.shape[0], *x.shape[2:])
    for k in range(x.shape[axis]):
        shifted = torch.roll(x, shifts=-k, dims=axis)  # shifted[..., i] = x[..., (i + k) mod L]
        if dense:
            y = y + torch.einsum("bchw,oc->bohw", shifted, w[:, :, k])
        else:
            y = y + w[:, 0, k].view(1, -1, 1, 1) * shifted
    return y + bias.view(1, -1, 1, 1)


def random_parc(channels: int, direction: str, meta: int, dense: bool, dtype=torch.float64, seed: int = 0) -> ParC:
    op = ParC(channels, direction, meta, groups=1 if dense else channels).to(dtype)
    activate_branches(op, seed=seed)  # N(0, 1/fan_in) kernel, N(0, 0.1²) bias, N(0, 0.5²) pe
    return op


# --- the operator ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True], ids=["depthwise", "dense"])
@pytest.mark.parametrize("direction", ["H", "W"])
@pytest.mark.parametrize("shape", [(7, 7), (7, 12), (12, 7), (14, 14), (20, 9)], ids=str)
def test_spatial_and_fft_paths_equal_the_index_formula(dense: bool, direction: str, shape: tuple[int, int]) -> None:
    meta = 7
    op = random_parc(6, direction, meta, dense)
    x = torch.randn(2, 6, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    length = shape[0] if direction == "H" else shape[1]
    weight, pe = op.instance_kernel(length)
    expected = circular_reference(x, weight, op.gcc_conv.bias, pe, direction, dense)
    for path in ("spatial", "fft"):
        op.path = path
        torch.testing.assert_close(op(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dense", [False, True], ids=["depthwise", "dense"])
@pytest.mark.parametrize("length", [7, 14, 32, 64])
def test_fft_path_matches_spatial_in_float32_with_input_gradients(dense: bool, length: int) -> None:
    op = random_parc(32, "W", 14, dense, dtype=torch.float32)
    x = torch.randn(1, 32, length, length, generator=torch.Generator().manual_seed(2), requires_grad=True)
    outputs, grads = {}, {}
    for path in ("spatial", "fft"):
        op.path = path
        outputs[path] = op(x)
        centre = outputs[path][0, :, length // 2, length // 2].relu().sum()  # the RepLKNet ERF objective
        (grads[path],) = torch.autograd.grad(centre, x)
    scale, grad_scale = outputs["spatial"].abs().max().item(), grads["spatial"].abs().max().item()
    torch.testing.assert_close(outputs["fft"], outputs["spatial"], rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(grads["fft"], grads["spatial"], rtol=1e-4, atol=1e-5 * grad_scale)
    # the gradient of one output reaches the whole row through the wrap-around: a global, circular receptive field
    row = grads["spatial"][0, :, length // 2, :].abs().sum(0)
    assert bool((row > 0).all())


@pytest.mark.parametrize("dense", [False, True], ids=["depthwise", "dense"])
@pytest.mark.parametrize("axis", [2, 3])
def test_fft_core_gradients_pass_gradcheck(dense: bool, axis: int) -> None:
    """The hand-written FFT backward (adjoint convolution, kernel correlation) against finite differences."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2 if dense else 1, x.shape[axis], generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: CircularCorrelationFFT.apply(a, b, axis), (x, w), fast_mode=True)


@pytest.mark.parametrize("dense", [False, True], ids=["depthwise", "dense"])
def test_parameter_gradients_agree_between_paths_through_the_interpolation(dense: bool) -> None:
    op = random_parc(4, "H", 7, dense)
    x = torch.randn(2, 4, 11, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = {}
    for path in ("spatial", "fft"):
        op.path = path
        op.zero_grad()
        op(x).square().sum().backward()
        grads[path] = [p.grad.clone() for p in (op.pe, op.gcc_conv.weight, op.gcc_conv.bias)]
    for spatial, fft in zip(grads["spatial"], grads["fft"]):
        torch.testing.assert_close(fft, spatial, rtol=1e-10, atol=1e-10)


def test_auto_path_follows_the_measured_crossover() -> None:
    depthwise, dense = ParC(4, "H", 7), ParC(4, "H", 7, groups=1)
    for length in (7, 14, 32, 64):
        assert depthwise.use_fft(length) == (length >= FFT_MIN_LENGTH["depthwise"])
        assert dense.use_fft(length) == (length >= FFT_MIN_LENGTH["dense"])
    depthwise.path = "spatial"
    assert not depthwise.use_fft(10_000)
    depthwise.path = "fft"
    assert depthwise.use_fft(1)
    depthwise.path = "fast"
    with pytest.raises(ValueError, match="'auto', 'spatial' or 'fft'"):
        depthwise.use_fft(7)
    with pytest.raises(ValueError, match="groups"):
        ParC(8, "H", 7, groups=2)
    with pytest.raises(ValueError, match="direction"):
        ParC(8, "V", 7)


def test_meta_kernel_interpolation_is_the_identity_at_the_native_size() -> None:
    op = random_parc(4, "H", 14, dense=False, dtype=torch.float32)
    weight, pe = op.instance_kernel(14)
    assert weight is op.gcc_conv.weight and pe is op.pe  # not even a copy: bit-for-bit the official kernel
    # and F.interpolate itself would also return the stored values at that size
    same = F.interpolate(op.gcc_conv.weight, size=(14, 1), mode="bilinear", align_corners=True)
    assert torch.equal(same, op.gcc_conv.weight)


def test_meta_kernel_interpolation_is_linear_with_endpoints_kept() -> None:
    meta = torch.arange(7.0, dtype=torch.float64).square().view(1, 1, 1, 7)  # 'W' kernel taps 0, 1, 4, ..., 36
    resized = parc_kernel(meta, 13, "W").flatten()  # u = t/2: even t on taps, odd t halfway between two taps
    assert resized.shape == (13,)
    torch.testing.assert_close(resized[0::2], meta.flatten())
    torch.testing.assert_close(resized[1::2], (meta.flatten()[:-1] + meta.flatten()[1:]) / 2)
    shrunk = parc_kernel(meta.transpose(2, 3), 4, "H").flatten()  # u = t·6/3 = 2t: taps 0, 2, 4, 6
    torch.testing.assert_close(shrunk, meta.flatten()[0::2])


def test_active_init_draws_the_position_embedding_at_probe_scale() -> None:
    model = ParCConvNeXt(depths=(1, 1, 3, 3), dims=(16, 32, 64, 128), ParC_insert_locs=(1, 1, 2, 2))
    assert model.stages[2][2].gcc_H.pe.std() < 0.05  # trained-scale init, trunc_normal(0.02)
    assert find_silenced_branches(model)  # layer scale 1e-6: random-init branches are silenced
    activate_branches(model, seed=3)
    pes = torch.cat([m.pe.flatten() for m in model.modules() if isinstance(m, ParC)])
    assert pes.numel() == 2 * (32 * 14 + 64 * 7)
    assert 0.45 < pes.std() < 0.55 and abs(pes.mean()) < 0.05
    assert find_silenced_branches(model) == []
    again = ParCConvNeXt(depths=(1, 1, 3, 3), dims=(16, 32, 64, 128), ParC_insert_locs=(1, 1, 2, 2))
    activate_branches(again, seed=3)
    assert torch.equal(again.stages[3][2].gcc_W.pe, model.stages[3][2].gcc_W.pe)


# --- the networks against the official code --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(REFS))
def reference(request):
    tag = request.param
    meta, tensors = load_meta(tag), load_tensors(tag)
    model = REFS[tag](**meta["constructor_kwargs"]).eval()
    model.load_state_dict(state_dict_of(tensors), strict=True)  # float16 ParC-ResNet tensors are cast on copy
    return tag, meta, tensors, model


@pytest.mark.parametrize("path", ["auto", "spatial", "fft"])
def test_reference_forward(reference, path: str) -> None:
    tag, meta, tensors, model = reference
    set_parc_path(model, path)
    try:
        with torch.no_grad():
            features = model.forward_features(tensors["input"])
            logits = model.forward_head(features)
            if path == "auto":
                assert torch.equal(model(tensors["input"]), logits)
    finally:
        set_parc_path(model, "auto")
    tolerance = meta["suggested_tolerance"]
    assert_close_to_ref(features, tensors["features"], tolerance["features"])
    assert_close_to_ref(logits, tensors["logits"], tolerance["logits"])


def test_spatial_path_reproduces_official_parc_resnet() -> None:
    """At 224 the meta kernels are used as stored, so the wrap-and-convolve path is the official arithmetic.

    (ParC-ConvNeXt is only float-close: timm's LayerNorm2d rounds differently from the official hand-written LN.)
    Bit for bit on the CPU the fixture was made on (an AMD EPYC); another CPU's oneDNN picks other convolution
    algorithms (Sapphire Rapids: 41 % of the elements differ, by at most 6.2e-6 on values of order 1), so the
    comparison is at float32 tolerance.
    """
    tag = "refs/parc_resnet50_small"
    meta, tensors = load_meta(tag), load_tensors(tag)
    model = ParCResNet(**meta["constructor_kwargs"], parc_path="spatial").eval()
    model.load_state_dict(state_dict_of(tensors), strict=True)
    with torch.no_grad():
        features = model.forward_features(tensors["input"])
    torch.testing.assert_close(features, tensors["features"], rtol=1e-5, atol=2e-5)


def test_reference_erf_target_is_the_features(reference) -> None:
    _, _, tensors, model = reference
    captured = []
    handle = model.get_submodule(model.erf_target).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            features = model.forward_features(tensors["input"][:1])
    finally:
        handle.remove()
    assert torch.equal(captured[0], features)


@pytest.mark.parametrize("size", [320, pytest.param(1024, marks=pytest.mark.slow)])
def test_reference_nets_run_at_other_sizes(reference, size: int) -> None:
    """Meta-kernel interpolation lets the 224-only official nets run at the ERF protocols' sizes (stage 4: 10, 32)."""
    _, _, tensors, model = reference
    x = F.interpolate(tensors["input"][:1], size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        features = model.forward_features(x)
        set_parc_path(model, "spatial")
        spatial = model.forward_features(x)
        set_parc_path(model, "auto")
    assert features.shape[-2:] == (size // 32, size // 32)
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, spatial, rtol=1e-4, atol=1e-4 * spatial.abs().max())


def test_reference_checkpoint_loads_through_load_checkpoint(reference, tmp_path) -> None:
    tag, meta, tensors, model = reference
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state_dict_of(tensors), "epoch": 300}, path)
    fresh = REFS[tag](**meta["constructor_kwargs"]).eval()
    info = load_checkpoint(fresh, path)
    assert info.source == "checkpoint"
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_edgeformer_v2_key_names_are_mapped() -> None:
    model = ParCConvNeXt(depths=(1, 1, 3, 3), dims=(16, 32, 64, 128), ParC_insert_locs=(1, 1, 2, 2))
    official = model.state_dict()
    renamed = {}
    for key, value in official.items():
        key = key.replace("gcc_H.gcc_conv.", "gcc_conv_1H.").replace("gcc_W.gcc_conv.", "gcc_conv_2W.")
        key = key.replace("gcc_H.pe", "gcc_conv_1H.meta_pe").replace("gcc_W.pe", "gcc_conv_2W.meta_pe")
        renamed[key] = value
    assert "stages.2.2.gcc_conv_1H.meta_pe" in renamed
    assert list(checkpoint_filter_fn({"model_ema": renamed}, model)) == list(official)


# --- registered full-size models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["parc_convnext_xt", "parc_convnext_t", "parc_resnet50"])
def test_registered_model_matches_the_official_manifest(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert_matches_manifest(model, name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert model.get_submodule(model.erf_target) is not None
    assert [info["module"] for info in model.feature_info][-1] == model.erf_target


@pytest.mark.parametrize("name,parc_blocks", [
    ("parc_convnext_xt", ["stages.2.6", "stages.2.7", "stages.2.8", "stages.3.2"]),
    ("parc_resnet50", ["layer3.3", "layer3.4", "layer3.5", "layer4.2"]),
])
def test_parc_placement_and_kind(name: str, parc_blocks: list[str]) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    ops = {n: m for n, m in model.named_modules() if isinstance(m, ParC)}
    assert sorted({n.rsplit(".", 1)[0] for n in ops}) == parc_blocks
    assert all(op.depthwise == name.startswith("parc_convnext") for op in ops.values())
    assert {op.meta_kernel_size for n, op in ops.items() if n.startswith(("stages.3", "layer4"))} == {7}


def test_timm_interface_on_a_small_parc_convnext() -> None:
    model = timm.create_model(
        "parc_convnext_xt", depths=(1, 1, 3, 3), dims=(16, 32, 64, 128), ParC_insert_locs=(1, 1, 2, 2), num_classes=10
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in intermediates] == [(16, 56, 56), (32, 28, 28), (64, 14, 14), (128, 7, 7)]
        assert torch.equal(final, model.forward_features(x))
        assert model.forward_head(final, pre_logits=True).shape == (1, 128)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3)
    features = timm.create_model("parc_convnext_xt", features_only=True, out_indices=(2, 3), depths=(1, 1, 3, 3),
                                 dims=(16, 32, 64, 128), ParC_insert_locs=(1, 1, 2, 2))
    assert [f.shape[1] for f in features(x)] == [64, 128]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["parc_convnext_xt", "parc_resnet50"])
def test_registered_model_runs_at_1024_and_320(name: str) -> None:
    model = timm.create_model(name).eval()
    for size in (320, 1024):
        with torch.no_grad():
            features = model.forward_features(torch.randn(1, 3, size, size))
        assert features.shape[-2:] == (size // 32, size // 32) and torch.isfinite(features).all()

