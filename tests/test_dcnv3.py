"""The grid_sample DCNv3 core against a slow, explicit float64 bilinear loop written from the sampling rule.

The loop is the specification (uniconvnet.md section 5) spelled out pixel by pixel, point by point, corner by corner,
so it shares no indexing trick with the fast core: offsets interleaved (x, y) per point, points with dx outer and
dy inner, raw mask, zero outside the image.
"""
from __future__ import annotations

import math

import pytest
import torch

from erf_tools.layers.dcnv3 import DCNv3, dcnv3_core
from erf_tools.weights import activate_branches, find_silenced_branches


def reference_dcnv3_core(
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    kernel_size: int = 3,
    pad: int = 1,
    dilation: int = 1,
    offset_scale: float = 1.0,
) -> torch.Tensor:
    """Explicit loop; differentiable (torch ops on scalars), so it also gives reference gradients."""
    n, height, width, channels = value.shape
    group_channels = channels // group
    points = kernel_size * kernel_size
    half = (kernel_size - 1) // 2
    rows = []
    for b in range(n):
        for h in range(height):
            for w in range(width):
                pixel = []
                for g in range(group):
                    chans = slice(g * group_channels, (g + 1) * group_channels)
                    acc = torch.zeros(group_channels, dtype=value.dtype)
                    for p in range(points):
                        i, j = divmod(p, kernel_size)
                        dx, dy = (i - half) * dilation, (j - half) * dilation
                        ox = offset[b, h, w, g * 2 * points + 2 * p]
                        oy = offset[b, h, w, g * 2 * points + 2 * p + 1]
                        x = w - pad + half * dilation + (dx + ox) * offset_scale
                        y = h - pad + half * dilation + (dy + oy) * offset_scale
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(group_channels, dtype=value.dtype)
                        for yy, xx, weight in (
                            (y0, x0, (1 - fy) * (1 - fx)),
                            (y0, x0 + 1, (1 - fy) * fx),
                            (y0 + 1, x0, fy * (1 - fx)),
                            (y0 + 1, x0 + 1, fy * fx),
                        ):
                            if 0 <= yy < height and 0 <= xx < width:
                                sample = sample + weight * value[b, yy, xx, chans]
                        acc = acc + mask[b, h, w, g * points + p] * sample
                    pixel.append(acc)
                rows.append(torch.cat(pixel))
    return torch.stack(rows).view(n, height, width, channels)


def _inputs(
    n=1, height=4, width=5, group=2, group_channels=3, kernel_size=3, offset_std=1.5, seed=0, dtype=torch.float64
):
    generator = torch.Generator().manual_seed(seed)
    points = kernel_size * kernel_size

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    value = randn(n, height, width, group * group_channels)
    offset = randn(n, height, width, group * points * 2) * offset_std
    mask = randn(n, height, width, group * points)
    return value, offset, mask


@pytest.mark.parametrize(
    "kernel_size, pad, dilation, offset_scale",
    [(3, 1, 1, 1.0), (3, 2, 2, 0.5), (5, 2, 1, 1.0)],
)
def test_core_matches_explicit_loop(kernel_size, pad, dilation, offset_scale):
    value, offset, mask = _inputs(n=2, height=5, width=6, kernel_size=kernel_size, offset_std=2.0)
    ours = dcnv3_core(value, offset, mask, 2, kernel_size, 1, pad, dilation, offset_scale)
    ref = reference_dcnv3_core(value, offset, mask, 2, kernel_size, pad, dilation, offset_scale)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_core_float32_matches_float64_loop():
    value, offset, mask = _inputs(n=1, height=6, width=6, group=2, group_channels=4, offset_std=1.0, seed=3)
    ref = reference_dcnv3_core(value, offset, mask, 2)
    ours = dcnv3_core(value.float(), offset.float(), mask.float(), 2)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("under_autocast", [False, True])
def test_reduced_precision_samples_at_float32_positions(under_autocast):
    """bf16 inputs (or bf16 autocast) on a 200-pixel-wide map: positions stay float32 (bf16 would round x≈200 to a
    multiple of 1 px); the result is the float32 core on the same rounded inputs, cast to bf16."""
    value, offset, mask = (t.to(torch.bfloat16) for t in
                           _inputs(n=1, height=4, width=200, group=2, group_channels=4, offset_std=0.3, seed=5))
    exact = dcnv3_core(value.float(), offset.float(), mask.float(), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under_autocast):
        ours = dcnv3_core(value, offset, mask, 2) if not under_autocast else \
            dcnv3_core(value.float(), offset.float(), mask.float(), 2)
    assert ours.dtype == (torch.float32 if under_autocast else torch.bfloat16)
    torch.testing.assert_close(ours.float(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())


def test_zero_offsets_are_a_masked_3x3_conv():
    """With zero offsets the core is a per-group 3x3 filter whose taps are the mask (dx outer, dy inner)."""
    value, _, mask = _inputs(n=1, height=5, width=5, group=1, group_channels=2, seed=4)
    mask = mask[:, :1, :1].expand(1, 5, 5, 9)  # the same 9 taps everywhere
    out = dcnv3_core(value, torch.zeros(1, 5, 5, 18, dtype=value.dtype), mask, 1)
    taps = mask[0, 0, 0].view(3, 3)  # taps[i, j] weights the pixel at (x + i - 1, y + j - 1)
    weight = taps.t().reshape(1, 1, 3, 3).expand(2, 1, 3, 3)  # conv weight is [dy, dx]
    conv = torch.nn.functional.conv2d(value.permute(0, 3, 1, 2), weight, padding=1, groups=2)
    torch.testing.assert_close(out, conv.permute(0, 2, 3, 1), rtol=0, atol=1e-12)


def test_offsets_move_samples_in_x_then_y():
    """Offset channel 2p shifts along x (width), 2p+1 along y (height): a one-pixel x offset on the centre tap."""
    value = torch.arange(20, dtype=torch.float64).view(1, 4, 5, 1)
    mask = torch.zeros(1, 4, 5, 9, dtype=torch.float64)
    mask[..., 4] = 1.0  # centre point only
    offset = torch.zeros(1, 4, 5, 18, dtype=torch.float64)
    offset[..., 8] = 1.0  # point 4, x
    out = dcnv3_core(value, offset, mask, 1)[0, :, :, 0]
    expected = torch.nn.functional.pad(value[0, :, 1:, 0], (0, 1))  # value at x + 1, zero past the border
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    offset[..., 8], offset[..., 9] = 0.0, 0.5  # half a pixel down
    out = dcnv3_core(value, offset, mask, 1)[0, :, :, 0]
    below = torch.nn.functional.pad(value[0, 1:, :, 0], (0, 0, 0, 1))
    torch.testing.assert_close(out, 0.5 * value[0, :, :, 0] + 0.5 * below, rtol=0, atol=1e-12)


def test_gradients_match_explicit_loop():
    value, offset, mask = _inputs(n=1, height=3, width=4, group=2, group_channels=2, seed=5)
    fast = [t.clone().requires_grad_() for t in (value, offset, mask)]
    slow = [t.clone().requires_grad_() for t in (value, offset, mask)]
    cotangent = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads_fast = torch.autograd.grad(dcnv3_core(*fast, 2), fast, cotangent)
    grads_slow = torch.autograd.grad(reference_dcnv3_core(*slow, 2), slow, cotangent)
    for name, a, b in zip(("value", "offset", "mask"), grads_fast, grads_slow):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d/d{name}")


def test_gradcheck_finite_differences():
    value, offset, mask = _inputs(n=1, height=3, width=3, group=1, group_channels=2, offset_std=0.7, seed=7)
    inputs = tuple(t.requires_grad_() for t in (value, offset, mask))
    assert torch.autograd.gradcheck(lambda v, o, m: dcnv3_core(v, o, m, 1), inputs, eps=1e-6, atol=1e-6)


def test_default_init_silences_the_branch_exactly():
    """Official init: offset and mask all zero, so the DCN branch outputs exactly 0 and passes exactly 0 gradient."""
    torch.manual_seed(0)
    dcn = DCNv3(channels=32, group=2)
    x = torch.randn(2, 6, 7, 32, requires_grad=True)
    out = dcn(x)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert dcn.silenced_parameters() == ["mask.weight", "mask.bias"]
    # the same in the core: a zero mask gives exactly zero output whatever the offsets
    value, offset, mask = _inputs(seed=8)
    assert torch.equal(dcnv3_core(value, offset, torch.zeros_like(mask), 2), torch.zeros_like(value))


def test_official_parameter_names_and_shapes():
    dcn = DCNv3(channels=64, group=4)
    shapes = {k: tuple(v.shape) for k, v in dcn.state_dict().items()}
    assert list(shapes) == [
        "dw_conv.0.weight", "dw_conv.0.bias", "offset.weight", "offset.bias", "mask.weight", "mask.bias",
        "input_proj.weight", "input_proj.bias", "output_proj.weight", "output_proj.bias",
    ]  # fmt: skip
    assert shapes["dw_conv.0.weight"] == (64, 1, 3, 3)
    assert shapes["offset.weight"] == (4 * 9 * 2, 64)
    assert shapes["mask.weight"] == (4 * 9, 64)
    bound = math.sqrt(6 / (64 + 64))  # xavier_uniform
    assert dcn.input_proj.weight.abs().max() <= bound and dcn.input_proj.weight.std() > bound / 3


def test_active_init_distribution():
    dcn = DCNv3(channels=256, group=16)
    dcn.active_init_(torch.Generator().manual_seed(0))
    assert dcn.silenced_parameters() == []
    # offset weight N(0, 1/C), bias N(0, 0.5^2); mask weight N(0, 0.25/C), bias N(0, 0.2^2)
    assert dcn.offset.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert dcn.offset.bias.std().item() == pytest.approx(0.5, rel=0.15)
    assert dcn.mask.weight.std().item() == pytest.approx(0.5 / 16, rel=0.05)
    assert dcn.mask.bias.std().item() == pytest.approx(0.2, rel=0.2)


def test_activate_branches_keeps_the_dcn_distribution():
    """activate_branches visits the DCNv3 before its offset/mask children; the DCN draw must survive that."""
    model = torch.nn.Sequential(DCNv3(channels=256, group=16))
    assert find_silenced_branches(model) == ["0.mask.weight", "0.mask.bias"]
    activate_branches(model, seed=1)
    assert find_silenced_branches(model) == []
    dcn = model[0]
    assert dcn.offset.bias.std().item() == pytest.approx(0.5, rel=0.15)  # the generic rule would give 0.1
    assert dcn.mask.weight.std().item() == pytest.approx(0.5 / 16, rel=0.05)  # generic: 1/16
    x = torch.randn(1, 5, 5, 256)
    assert dcn(x).abs().mean() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    value, offset, mask = _inputs(n=2, height=9, width=7, group=4, group_channels=8, dtype=torch.float32, seed=9)
    cpu = dcnv3_core(value, offset, mask, 4)
    cuda = dcnv3_core(value.cuda(), offset.cuda(), mask.cuda(), 4).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-5)
