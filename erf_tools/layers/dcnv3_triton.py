"""Triton kernels for the DCNv3 sampling core on CUDA; the ``grid_sample`` core stays the reference and fallback.

The GPU counterpart of the fused CPU kernel (:mod:`erf_tools.layers.dcnv3_fused`): the same function as
:func:`erf_tools.layers.dcnv3.dcnv3_core` (same positions, zero padding, stride, dilation, group layout), without the
(N, G, C/G, P, H·W) sample tensor. One Triton program takes a block of output pixels of one group: for each of the P
kernel points it gathers the four bilinear corners of the group's channels, weights them by the raw mask and sums.
The hand-written backward recomputes the corners; the mask and offset gradients are per output pixel and point
(reduced over the group's channels, no conflicts), the value gradient is scattered with ``tl.atomic_add`` into a
float32 (float64 for float64 inputs) buffer, so its last bits depend on the order of the atomics.

:func:`~erf_tools.layers.dcnv3.dcnv3_core` runs it for CUDA float32/float64 tensors when ``triton`` is importable
and the backend (``ERF_TOOLS_DCNV3_CORE``, shared with the CPU kernel: ``auto``, ``fused`` or ``reference``) allows:
``auto`` compiles it on the first CUDA call (a tiny forward and backward) and, if that fails, warns once and uses the
reference; ``fused`` makes such a failure an error. The kernels are verified against the reference in Triton's
interpreter on CPU (``TRITON_INTERPRET=1``, tests/test_dcnv3_triton.py) and by ``bench/bench_erf.py gpu`` on a GPU.
"""
from __future__ import annotations

import torch

from erf_tools.extension_build import BuiltOnFirstUse, ExtensionUnavailable
from erf_tools.layers.dcnv3_fused import FALLBACK, fused_kernel_takes, get_core_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below stay plain, never-called functions
    triton = tl = None

__all__ = ["KERNELS", "DCNv3TritonCore", "TritonCoreUnavailable", "triton_dcnv3_core", "use_triton_core"]


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _corners(offset, pix, pix_ok, grp, p, n, cx, cy, h_in, w_in, group, points, kernel_size, dilation, offset_scale):
    """Point p of the pixels ``pix`` (group ``grp``): flat input pixel of the top-left corner, fractions, and which
    of the corners (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1) lie in the image."""
    half = (kernel_size - 1) // 2
    dx = (p // kernel_size - half) * dilation
    dy = (p % kernel_size - half) * dilation
    at = offset + pix * (group * points * 2) + grp * (points * 2) + 2 * p
    off_x = tl.load(at, mask=pix_ok, other=0.0)
    x = cx.to(off_x.dtype) + (dx + off_x) * offset_scale
    y = cy.to(off_x.dtype) + (dy + tl.load(at + 1, mask=pix_ok, other=0.0)) * offset_scale
    # NaN or far outside: no corner can be inside (keeps the integer conversion defined)
    inside = pix_ok & (x > -2.0) & (x < w_in + 1.0) & (y > -2.0) & (y < h_in + 1.0)
    x = tl.where(inside, x, -2.0)
    y = tl.where(inside, y, -2.0)
    xf = tl.floor(x)
    yf = tl.floor(y)
    x0 = xf.to(tl.int64)
    y0 = yf.to(tl.int64)
    vx0 = (x0 >= 0) & (x0 < w_in)
    vx1 = (x0 + 1 >= 0) & (x0 + 1 < w_in)
    vy0 = (y0 >= 0) & (y0 < h_in)
    vy1 = (y0 + 1 >= 0) & (y0 + 1 < h_in)
    corner = (n * h_in + y0) * w_in + x0
    return corner, x - xf, y - yf, vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1


@_jit
def _pixels(pid, pixels, h_out, w_out, stride, pad, dilation, kernel_size, group_channels, BLOCK_PIX: tl.constexpr,
            BLOCK_C: tl.constexpr):
    """The block's output pixels (flat (n*H + h)*W + w), which exist, their batch index and regular-grid centre
    (integers); the channels of a group and which exist (as a row)."""
    pix = pid.to(tl.int64) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    w = pix % w_out
    row = pix // w_out
    shift = dilation * ((kernel_size - 1) // 2) - pad
    c = tl.arange(0, BLOCK_C)
    return (pix, pix < pixels, row // h_out, w * stride + shift, (row % h_out) * stride + shift, c,
            (c < group_channels)[None, :])


@_jit
def _forward_kernel(value, offset, mask, out, pixels, h_in, w_in, h_out, w_out, channels, group, group_channels,
                    kernel_size, stride, pad, dilation, offset_scale, BLOCK_PIX: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    grp = tl.program_id(1)
    pix, pix_ok, n, cx, cy, c, c_ok = _pixels(tl.program_id(0), pixels, h_out, w_out, stride, pad, dilation,
                                              kernel_size, group_channels, BLOCK_PIX, BLOCK_C)
    points = kernel_size * kernel_size
    acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=value.dtype.element_ty)
    for p in range(points):
        corner, fx, fy, ok00, ok01, ok10, ok11 = _corners(offset, pix, pix_ok, grp, p, n, cx, cy, h_in, w_in, group,
                                                          points, kernel_size, dilation, offset_scale)
        m = tl.load(mask + pix * (group * points) + grp * points + p, mask=pix_ok, other=0.0)
        at = value + (corner * channels + grp * group_channels)[:, None] + c[None, :]
        v00 = tl.load(at, mask=ok00[:, None] & c_ok, other=0.0)
        v01 = tl.load(at + channels, mask=ok01[:, None] & c_ok, other=0.0)
        v10 = tl.load(at + w_in * channels, mask=ok10[:, None] & c_ok, other=0.0)
        v11 = tl.load(at + (w_in + 1) * channels, mask=ok11[:, None] & c_ok, other=0.0)
        fx, fy = fx[:, None], fy[:, None]
        acc += m[:, None] * ((1 - fy) * ((1 - fx) * v00 + fx * v01) + fy * ((1 - fx) * v10 + fx * v11))
    at = out + (pix * channels + grp * group_channels)[:, None] + c[None, :]
    tl.store(at, acc, mask=pix_ok[:, None] & c_ok)


@_jit
def _backward_kernel(grad_out, value, offset, mask, grad_value, grad_offset, grad_mask, pixels, h_in, w_in, h_out,
                     w_out, channels, group, group_channels, kernel_size, stride, pad, dilation, offset_scale,
                     BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr):
    grp = tl.program_id(1)
    pix, pix_ok, n, cx, cy, c, c_ok = _pixels(tl.program_id(0), pixels, h_out, w_out, stride, pad, dilation,
                                              kernel_size, group_channels, BLOCK_PIX, BLOCK_C)
    points = kernel_size * kernel_size
    go = tl.load(grad_out + (pix * channels + grp * group_channels)[:, None] + c[None, :],
                 mask=pix_ok[:, None] & c_ok, other=0.0)
    for p in range(points):
        corner, fx, fy, ok00, ok01, ok10, ok11 = _corners(offset, pix, pix_ok, grp, p, n, cx, cy, h_in, w_in, group,
                                                          points, kernel_size, dilation, offset_scale)
        at_mask = pix * (group * points) + grp * points + p
        m = tl.load(mask + at_mask, mask=pix_ok, other=0.0)
        corner_at = (corner * channels + grp * group_channels)[:, None] + c[None, :]
        ok00, ok01, ok10, ok11 = ok00[:, None] & c_ok, ok01[:, None] & c_ok, ok10[:, None] & c_ok, ok11[:, None] & c_ok
        v00 = tl.load(value + corner_at, mask=ok00, other=0.0)
        v01 = tl.load(value + corner_at + channels, mask=ok01, other=0.0)
        v10 = tl.load(value + corner_at + w_in * channels, mask=ok10, other=0.0)
        v11 = tl.load(value + corner_at + (w_in + 1) * channels, mask=ok11, other=0.0)
        fx, fy = fx[:, None], fy[:, None]
        sample = (1 - fy) * ((1 - fx) * v00 + fx * v01) + fy * ((1 - fx) * v10 + fx * v11)
        tl.store(grad_mask + at_mask, tl.sum(go * sample, axis=1), mask=pix_ok)
        scale = m * offset_scale
        d_x = tl.sum(go * ((1 - fy) * (v01 - v00) + fy * (v11 - v10)), axis=1) * scale
        d_y = tl.sum(go * ((1 - fx) * (v10 - v00) + fx * (v11 - v01)), axis=1) * scale
        at_offset = grad_offset + pix * (group * points * 2) + grp * (points * 2) + 2 * p
        tl.store(at_offset, d_x, mask=pix_ok)
        tl.store(at_offset + 1, d_y, mask=pix_ok)
        g = go * m[:, None]
        tl.atomic_add(grad_value + corner_at, g * ((1 - fy) * (1 - fx)), mask=ok00)
        tl.atomic_add(grad_value + corner_at + channels, g * ((1 - fy) * fx), mask=ok01)
        tl.atomic_add(grad_value + corner_at + w_in * channels, g * (fy * (1 - fx)), mask=ok10)
        tl.atomic_add(grad_value + corner_at + (w_in + 1) * channels, g * (fy * fx), mask=ok11)


def _launch(value, offset, geometry):
    """Grid, block sizes and the integer/float arguments shared by both kernels."""
    group, kernel_size, stride, pad, dilation, offset_scale = geometry
    n, h_in, w_in, channels = value.shape
    _, h_out, w_out, _ = offset.shape
    pixels = n * h_out * w_out
    block_c = triton.next_power_of_2(channels // group)
    block_pix = max(1, min(64, 2048 // block_c))
    grid = (triton.cdiv(pixels, block_pix), group)
    args = (pixels, h_in, w_in, h_out, w_out, channels, group, channels // group, kernel_size, stride, pad, dilation,
            offset_scale)
    return grid, args, dict(BLOCK_PIX=block_pix, BLOCK_C=block_c)


class DCNv3TritonCore(torch.autograd.Function):
    """``apply(value, offset, mask, geometry)`` with contiguous NHWC tensors of one dtype and ``geometry = (group,
    kernel_size, stride, pad, dilation, offset_scale)``; first-order gradients for value, offset and mask."""

    @staticmethod
    def forward(ctx, value, offset, mask, geometry):
        ctx.geometry = geometry
        ctx.save_for_backward(value, offset, mask)
        out = value.new_empty((*offset.shape[:3], value.shape[3]))
        grid, args, blocks = _launch(value, offset, geometry)
        _forward_kernel[grid](value, offset, mask, out, *args, **blocks)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, offset, mask = ctx.saved_tensors
        accumulate = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=accumulate, device=value.device)
        grad_offset, grad_mask = torch.empty_like(offset), torch.empty_like(mask)
        grid, args, blocks = _launch(value, offset, ctx.geometry)
        _backward_kernel[grid](grad_out.contiguous(), value, offset, mask, grad_value, grad_offset, grad_mask, *args,
                               **blocks)
        grads = (grad_value.to(value.dtype), grad_offset, grad_mask)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None)


def triton_dcnv3_core(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, group: int, kernel_size: int = 3,
                      stride: int = 1, pad: int = 1, dilation: int = 1, offset_scale: float = 1.0) -> torch.Tensor:
    """The DCNv3 core by the Triton kernels: same arguments, layout and result as
    :func:`erf_tools.layers.dcnv3.dcnv3_core` (which validates the shapes and calls this when
    :func:`use_triton_core` says so). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if triton is None:
        raise TritonCoreUnavailable("triton is not installed")
    geometry = (int(group), int(kernel_size), int(stride), int(pad), int(dilation), float(offset_scale))
    return DCNv3TritonCore.apply(value.contiguous(), offset.contiguous(), mask.contiguous(), geometry)


class TritonCoreUnavailable(ExtensionUnavailable):
    """The Triton DCNv3 core cannot run here: triton is missing or its kernels failed to compile (the message says
    which)."""


class _TritonKernels(BuiltOnFirstUse):
    """Compiles the float32 kernels once per process by running a tiny forward and backward on the current GPU."""

    def _build(self) -> None:
        if triton is None:
            raise ImportError("triton is not installed")
        generator = torch.Generator().manual_seed(0)
        value, offset, mask = (torch.randn(1, 3, 3, k, generator=generator).cuda().requires_grad_()
                               for k in (4, 36, 18))
        out = triton_dcnv3_core(value, offset, mask, 2)
        torch.autograd.grad(out, (value, offset, mask), torch.ones_like(out))
        torch.cuda.synchronize()


#: The kernels' compile state (``KERNELS.state``), shared by all calls of a process.
KERNELS = _TritonKernels(what="the Triton DCNv3 core", error=TritonCoreUnavailable)


def use_triton_core(*tensors: torch.Tensor) -> bool:
    """Whether :func:`~erf_tools.layers.dcnv3.dcnv3_core` should run the Triton kernels on these inputs.

    Only CUDA tensors: ``auto``, yes for float32/float64 of one dtype when the kernels compile (else one warning,
    then the reference); ``fused``, the same, but other CUDA inputs or a failed compilation are an error;
    ``reference``, never."""
    backend = get_core_backend()
    if backend == "reference" or not all(t.device.type == "cuda" for t in tensors):
        return False
    if not fused_kernel_takes(tensors, "cuda"):
        if backend == "fused":
            raise ValueError("the Triton DCNv3 core takes CUDA float32/float64 tensors of one dtype, got "
                             + ", ".join(str(t.dtype) for t in tensors))
        return False
    return KERNELS.wanted(backend, FALLBACK, stacklevel=3)
