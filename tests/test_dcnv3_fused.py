"""The fused C++ DCNv3 core against the grid_sample reference and finite differences.

The reference is the ``grid_sample`` path of :func:`dcnv3_core` (itself checked against an explicit per-pixel loop
in test_dcnv3.py); the fused kernel must compute the same function to float rounding, its hand-written backward must
pass ``gradcheck`` in float64 for value, offset and mask, and a failed build must fall back with one warning.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from erf_tools.extension_build import BuildState
from erf_tools.layers import dcnv3_fused
from erf_tools.layers.dcnv3 import DCNv3, dcnv3_core
from erf_tools.layers.dcnv3_fused import (
    FusedCoreUnavailable,
    core_backend,
    fused_core_available,
    fused_dcnv3_core,
    get_core_backend,
    set_core_backend,
    use_fused_core,
)

pytestmark = pytest.mark.skipif(not fused_core_available(), reason="the fused DCNv3 extension cannot be built here")


def random_case(seed, dtype=torch.float64, n=None, height=None, width=None, group=None, group_channels=None,
                kernel_size=None, offset_std=None):
    """Random shapes and values; offsets large enough that many samples fall on or past the border."""
    rng = torch.Generator().manual_seed(seed)

    def pick(value, choices):
        return value if value is not None else choices[int(torch.randint(len(choices), (1,), generator=rng))]

    n, height, width = pick(n, [1, 2]), pick(height, [1, 2, 3, 5, 8]), pick(width, [1, 2, 4, 7])
    group, group_channels = pick(group, [1, 2, 3]), pick(group_channels, [1, 3, 8, 16])
    kernel_size, offset_std = pick(kernel_size, [1, 3, 5]), pick(offset_std, [0.3, 1.5, 4.0])
    points = kernel_size * kernel_size
    value = torch.randn(n, height, width, group * group_channels, generator=rng, dtype=dtype)
    offset = torch.randn(n, height, width, group * points * 2, generator=rng, dtype=dtype) * offset_std
    mask = torch.randn(n, height, width, group * points, generator=rng, dtype=dtype)
    return (value, offset, mask), dict(group=group, kernel_size=kernel_size)


def both(inputs, **geometry):
    """(fused, reference) outputs and input gradients for one random cotangent."""
    results = []
    for backend in ("fused", "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with core_backend(backend):
            out = dcnv3_core(*leaves, **geometry)
        cotangent = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        results.append((out.detach(), torch.autograd.grad(out, leaves, cotangent)))
    return results


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_match_reference_float64(seed):
    inputs, geometry = random_case(seed)
    pad = geometry["kernel_size"] // 2
    (fused, fused_grads), (ref, ref_grads) = both(inputs, **geometry, pad=pad)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    for name, a, b in zip(("value", "offset", "mask"), fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"d/d{name}")


@pytest.mark.parametrize("stride, pad, dilation, offset_scale", [(1, 2, 2, 0.5), (2, 1, 1, 1.0), (1, 0, 1, 2.0)])
def test_geometry_matches_reference(stride, pad, dilation, offset_scale):
    rng = torch.Generator().manual_seed(3)
    h_in, w_in, group, cg = 7, 6, 2, 4
    h_out, w_out = (h_in + 2 * pad - dilation * 2 - 1) // stride + 1, (w_in + 2 * pad - dilation * 2 - 1) // stride + 1
    value = torch.randn(2, h_in, w_in, group * cg, generator=rng, dtype=torch.float64)
    offset = torch.randn(2, h_out, w_out, group * 18, generator=rng, dtype=torch.float64) * 1.5
    mask = torch.randn(2, h_out, w_out, group * 9, generator=rng, dtype=torch.float64)
    (fused, fused_grads), (ref, ref_grads) = both(
        (value, offset, mask), group=group, stride=stride, pad=pad, dilation=dilation, offset_scale=offset_scale)
    assert fused.shape == (2, h_out, w_out, group * cg)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_border_and_far_samples():
    """Samples on pixel centres and edges, half outside, far outside (zero, zero gradient).

    Where a position is an integer the offset derivative is one-sided; the fused kernel takes the right-hand one
    (floor of the exact position), which the reference's normalised coordinates reach only up to rounding, so the
    offset gradient is compared with the reference a hair to the right (bilinear is linear within a cell)."""
    value = torch.randn(1, 4, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    offset = torch.zeros(1, 4, 5, 18, dtype=torch.float64)
    offset[..., 0::2] = torch.tensor([0.0, 0.5, -0.5, 4.0, -3.25, 1e6, -1e6, 2.5, -1.0], dtype=torch.float64)
    offset[..., 1::2] = torch.tensor([3.0, -0.5, 0.25, 0.0, 1e7, -2.0, 0.0, -3.5, 0.75], dtype=torch.float64)
    mask = torch.randn(1, 4, 5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (fused, fused_grads), (ref, ref_grads) = both((value, offset, mask), group=1)
    _, (_, right_grads) = both((value, offset + 1e-9, mask), group=1)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused_grads[0], ref_grads[0], rtol=0, atol=1e-11)
    torch.testing.assert_close(fused_grads[2], ref_grads[2], rtol=0, atol=1e-11)
    torch.testing.assert_close(fused_grads[1], right_grads[1], rtol=0, atol=1e-7)
    assert torch.equal(fused_grads[2][..., 5], torch.zeros_like(fused_grads[2][..., 5]))  # 1e6 px away: nothing
    assert torch.equal(fused_grads[1][..., 8:10], torch.zeros_like(fused_grads[1][..., 8:10]))  # 1e7 px: nothing


@pytest.mark.parametrize("group_channels", [16, 5])  # 16: the unrolled kernel UniConvNet uses; 5: the generic one
def test_float32_matches_reference_to_rounding(group_channels):
    """At UniConvNet's map sizes the positions are ~100 px, whose float32 ulp (~1e-5) bounds the difference."""
    inputs, geometry = random_case(6, dtype=torch.float32, n=1, height=40, width=48, group=4,
                                   group_channels=group_channels, kernel_size=3, offset_std=1.0)
    (fused, fused_grads), (ref, ref_grads) = both(inputs, **geometry)
    assert fused.dtype == torch.float32
    scale = ref.abs().max().item()
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5 * scale)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_two_threads_reduce_the_value_gradient_exactly():
    """Several chunks scatter into private buffers summed at the end: same gradient as one thread (float64)."""
    inputs, geometry = random_case(7, n=2, height=24, width=20, group=2, group_channels=8, kernel_size=3,
                                   offset_std=6.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = both(inputs, **geometry)[0]
        torch.set_num_threads(2)
        two, ref = both(inputs, **geometry)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two[0], one[0], rtol=0, atol=0)
    for a, b, r in zip(two[1], one[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
        torch.testing.assert_close(a, r, rtol=0, atol=1e-11)


@pytest.mark.parametrize("wrt", ["value", "offset", "mask"])
def test_gradcheck_float64(wrt):
    """Finite differences of the fused op, one input at a time (offsets away from integer positions)."""
    inputs, geometry = random_case(8, n=1, height=3, width=4, group=2, group_channels=3, kernel_size=3,
                                   offset_std=0.8)
    index = ("value", "offset", "mask").index(wrt)

    def fn(x):
        args = list(inputs)
        args[index] = x
        return fused_dcnv3_core(*args, **geometry)

    x = inputs[index].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reduced_precision_goes_through_float32():
    """bf16 inputs and bf16 autocast: the fused kernel runs in float32 and the result equals the float32 reference."""
    inputs, geometry = random_case(9, dtype=torch.float32, n=1, height=4, width=200, group=2, group_channels=4,
                                   kernel_size=3, offset_std=0.3)
    half = [t.to(torch.bfloat16) for t in inputs]
    with core_backend("reference"):
        exact = dcnv3_core(*[t.float() for t in half], **geometry)
    with core_backend("fused"):
        ours = dcnv3_core(*half, **geometry)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = dcnv3_core(*[t.float() for t in half], **geometry)
    assert ours.dtype == torch.bfloat16 and autocast.dtype == torch.float32
    # positions ~200 px: the reference's normalised coordinates round at ~1e-5 px
    torch.testing.assert_close(autocast, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    # bf16 output: the float32 result rounded once (half a bf16 ulp, 2**-9 relative)
    torch.testing.assert_close(ours.float(), exact, rtol=2**-8, atol=1e-4 * exact.abs().max().item())


def test_dcnv3_module_uses_fused_path_by_default(monkeypatch):
    monkeypatch.delenv(dcnv3_fused.ENV_VAR, raising=False)
    assert get_core_backend() == "auto"
    dcn = DCNv3(channels=32, group=2)
    dcn.active_init_(torch.Generator().manual_seed(0))
    x = torch.randn(1, 6, 7, 32, dtype=torch.float64)
    dcn.double()
    calls = []
    original = dcnv3_fused._FusedCore.apply
    monkeypatch.setattr(dcnv3_fused._FusedCore, "apply", lambda *a: calls.append(1) or original(*a))
    fused = dcn(x)
    with core_backend("reference"):
        ref = dcn(x)
    assert calls == [1]
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1, dtype=torch.float32)
    monkeypatch.setenv(dcnv3_fused.ENV_VAR, "reference")
    assert get_core_backend() == "reference" and not use_fused_core(cpu)
    with core_backend("fused"):
        assert use_fused_core(cpu)
        with pytest.raises(ValueError, match="float32/float64"):
            use_fused_core(cpu.to(torch.bfloat16))
    assert get_core_backend() == "reference"
    monkeypatch.setenv(dcnv3_fused.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        get_core_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        set_core_backend("cuda")
    monkeypatch.setenv(dcnv3_fused.ENV_VAR, "auto")
    assert not use_fused_core(torch.zeros(1, dtype=torch.float16))  # auto: other inputs go to the reference
    assert not use_fused_core(cpu.to("meta"))


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    """A missing compiler: auto warns once and uses the reference; forcing "fused" is a clear error."""
    monkeypatch.setattr(dcnv3_fused.EXTENSION, "state", BuildState(error="CalledProcessError: no compiler"))
    monkeypatch.delenv(dcnv3_fused.ENV_VAR, raising=False)
    inputs, geometry = random_case(10, n=1, height=3, width=3, group=1, group_channels=2, kernel_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = dcnv3_core(*inputs, **geometry)
        second = dcnv3_core(*inputs, **geometry)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no compiler" in messages[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with core_backend("reference"):
        torch.testing.assert_close(first, dcnv3_core(*inputs, **geometry), rtol=0, atol=0)
    with core_backend("fused"), pytest.raises(FusedCoreUnavailable, match="no compiler"):
        dcnv3_core(*inputs, **geometry)
