"""UniConvNet's modified DCNv3 (deformable convolution v3) in pure PyTorch.

UniConvNet (Wang & Xi, ICCV 2025) puts InternImage's DCNv3 in the second residual branch of every block, with two
changes: the depthwise 3x3 conv that predicts offsets and masks has no LayerNorm and no GELU after it, and the
modulation mask is used raw (no softmax over the points of a group). The official repository only ships a CUDA op
(its CPU kernel is a stub), so the ERF of a UniConvNet cannot be measured on a CPU with it. This module implements the
same function with ``F.grid_sample``: vectorised, differentiable with respect to the input, the offsets and the mask,
and equal on CPU and CUDA. Float32/float64 calls run a fused kernel of the same function instead: C++ on CPU
(:mod:`erf_tools.layers.dcnv3_fused`, built on first use), Triton on CUDA (:mod:`erf_tools.layers.dcnv3_triton`,
compiled on first use, when ``triton`` is installed); this ``grid_sample`` path is their reference and fallback.

The sampling rule, for output pixel (h, w), group g, channel c of the group and kernel point p (InternImage's
``dcnv3_core_pytorch``, as modified by UniConvNet)::

    out[h, w, g*Cg + c] = sum_p mask[h, w, g*P + p] * bilinear(value[..., g*Cg + c],
                                                               x = w + (dx_p + offset_x) * offset_scale,
                                                               y = h + (dy_p + offset_y) * offset_scale)

with ``offset_x = offset[h, w, g*2P + 2p]`` and ``offset_y = offset[h, w, g*2P + 2p + 1]`` (x then y, interleaved per
point), ``p = i*K + j``, ``dx_p = i - (K-1)//2`` (outer index) and ``dy_p = j - (K-1)//2`` (inner index). Pixel centres
have integer coordinates and the value reads as 0 outside the image (zero padding).

Parameter names are the official ones (``dw_conv.0``, ``offset``, ``mask``, ``input_proj``, ``output_proj``) so that
official checkpoints load strictly.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from erf_tools.layers.dcnv3_fused import fused_dcnv3_core, use_fused_core
from erf_tools.layers.dcnv3_triton import triton_dcnv3_core, use_triton_core

__all__ = ["DCNv3", "core_path", "dcnv3_core"]


def _kernel_points(kernel_size: int, dilation: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (dx, dy) of the K*K kernel points, in the official order p = i*K + j with dx from i (outer), dy from j."""
    half = (kernel_size - 1) // 2
    steps = (torch.arange(kernel_size, dtype=dtype, device=device) - half) * dilation
    dx, dy = torch.meshgrid(steps, steps, indexing="ij")  # dx varies along the outer index
    return torch.stack([dx.reshape(-1), dy.reshape(-1)], dim=-1)  # (P, 2), last dim (x, y)


def core_path(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> str:
    """Which implementation :func:`dcnv3_core` runs on these (float32/float64) inputs under the backend in force:
    ``"triton"`` (CUDA), ``"fused"`` (the C++ kernel, CPU) or ``"reference"`` (``grid_sample``)."""
    if use_triton_core(value, offset, mask):
        return "triton"
    return "fused" if use_fused_core(value, offset, mask) else "reference"


def dcnv3_core(
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    kernel_size: int = 3,
    stride: int = 1,
    pad: int = 1,
    dilation: int = 1,
    offset_scale: float = 1.0,
) -> torch.Tensor:
    """Deformable sampling of UniConvNet's DCNv3: the raw-mask-weighted sum of bilinear samples of ``value``.

    Args:
        value: (N, H_in, W_in, C) channels-last tensor that is sampled (``input_proj`` output).
        offset: (N, H, W, G*P*2) offsets in pixels, (x, y) interleaved per point, grouped by g.
        mask: (N, H, W, G*P) modulation scalars, used as given (no softmax).
        group: number of groups G; the C channels are split into G groups of C//G that share offsets and mask.
        kernel_size, stride, pad, dilation: the regular sampling grid (output (h, w) is centred on input
            ``(h*stride - pad + dilation*(K-1)//2, ...)``); zero padding outside the input.
        offset_scale: factor applied to the kernel point and its offset together.

    Returns:
        (N, H, W, C) tensor, same dtype as ``value``.

    ``grid_sample`` with ``align_corners=False`` maps pixel coordinate x to the normalised ``(2x + 1)/W_in - 1`` and
    reads zeros outside the image, which is the official rule without materialising a padded copy of ``value``.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    reduced = (torch.float16, torch.bfloat16)
    device_type = value.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast or any(t.dtype in reduced for t in (value, offset, mask)):
        # Sampling positions in float32 whatever the autocast: in bf16 a coordinate of 256 has a resolution of 2 px
        # (UniConvNet's stage-0 maps at 1024² input), which turns the bilinear samples into noise.
        with torch.autocast(device_type, enabled=False) if autocast else nullcontext():
            out = dcnv3_core(value.float(), offset.float(), mask.float(), group, kernel_size, stride, pad, dilation,
                             offset_scale)
        return out.to(value.dtype)
    n, h_in, w_in, channels = value.shape
    _, h_out, w_out, _ = offset.shape
    points = kernel_size * kernel_size
    if channels % group:
        raise ValueError(f"{channels} channels cannot be split into {group} groups")
    if offset.shape != (n, h_out, w_out, group * points * 2):
        raise ValueError(f"offset must be (N, H, W, {group * points * 2}), got {tuple(offset.shape)}")
    if mask.shape != (n, h_out, w_out, group * points):
        raise ValueError(f"mask must be (N, H, W, {group * points}), got {tuple(mask.shape)}")
    path = core_path(value, offset, mask)
    if path != "reference":  # a fused kernel of the same function: dcnv3_triton.py (CUDA), dcnv3_fused.py (CPU)
        fused = triton_dcnv3_core if path == "triton" else fused_dcnv3_core
        return fused(value, offset, mask, group, kernel_size, stride, pad, dilation, offset_scale)
    group_channels = channels // group
    dtype, device = offset.dtype, offset.device

    # Everything that does not depend on the offsets is one small (1, H, W, 1, P, 2) tensor of normalised positions:
    # grid = ((centre + kernel_point * s + 0.5) * 2 / size - 1) + offset * s * 2 / size.
    to_normalised = torch.tensor([2.0 / w_in, 2.0 / h_in], dtype=dtype, device=device)
    centre_shift = dilation * (kernel_size - 1) // 2 - pad
    cx = torch.arange(w_out, dtype=dtype, device=device) * stride + centre_shift
    cy = torch.arange(h_out, dtype=dtype, device=device) * stride + centre_shift
    centres = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), dim=-1)  # (H, W, 2) holding (x, y)
    kernel = _kernel_points(kernel_size, dilation, dtype, device) * offset_scale  # (P, 2)
    base = (centres[:, :, None, :] + kernel + 0.5) * to_normalised - 1.0  # (H, W, P, 2)
    base = base[None, :, :, None]  # (1, H, W, 1, P, 2)
    grid = torch.addcmul(base, offset.view(n, h_out, w_out, group, points, 2), to_normalised * offset_scale)

    # One grid_sample call for all groups: the group goes into the batch, the points next to the output rows, so the
    # mask reduction runs over a non-innermost dim of contiguous memory.
    grid = grid.permute(0, 3, 4, 1, 2, 5).reshape(n * group, points * h_out, w_out, 2)
    sampled_from = value.view(n, h_in * w_in, group, group_channels).permute(0, 2, 3, 1)
    sampled_from = sampled_from.reshape(n * group, group_channels, h_in, w_in)
    samples = F.grid_sample(sampled_from, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    samples = samples.view(n, group, group_channels, points, h_out * w_out)
    # A contiguous mask makes the broadcast product stream through memory (a strided one is several times slower).
    weights = mask.view(n, h_out * w_out, group, points).permute(0, 2, 3, 1).contiguous().unsqueeze(2)
    out = (samples * weights).sum(dim=3)  # (N, G, Cg, HW); weights is (N, G, 1, P, HW)
    return out.permute(0, 3, 1, 2).reshape(n, h_out, w_out, channels)


class _SamplingLinear(nn.Linear):
    """The ``offset`` / ``mask`` projection of DCNv3, with its own all-branches-active draw.

    :func:`erf_tools.weights.activate_branches` applies the generic Linear rule to every module in ``named_modules()``
    order and calls ``active_init_`` right after each module's own parameters, i.e. *before* it reaches the children
    of a DCNv3. Carrying the draw on the child layers keeps the DCN-specific distribution whatever that order is.
    """

    def __init__(self, in_features: int, out_features: int, weight_variance: float, bias_std: float) -> None:
        super().__init__(in_features, out_features)
        self.active_weight_variance = weight_variance  # times 1/in_features
        self.active_bias_std = bias_std

    @torch.no_grad()
    def active_init_(self, generator: torch.Generator) -> None:
        """Weight ~ N(0, variance/C), bias ~ N(0, std^2), drawn from ``generator`` (the conformance randomisation)."""
        weight_std = math.sqrt(self.active_weight_variance / self.in_features)
        self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * weight_std)
        self.bias.copy_(torch.randn(self.bias.shape, generator=generator) * self.active_bias_std)


class DCNv3(nn.Module):
    """UniConvNet's DCNv3 on channels-last input: ``output_proj(core(input_proj(x), offset(f), mask(f)))``, ``f =
    dw_conv(x)``.

    Constructed by UniConvNet as ``DCNv3(channels=C, kernel_size=3, group=G)``; the official ``act_layer`` and
    ``norm_layer`` arguments are unused by the modified module and are not accepted here. ``center_feature_scale`` and
    ``remove_center`` are False in UniConvNet and not implemented.
    """

    #: Offsets of about one pixel (so sampling is off-grid) and a non-zero raw mask; see ``active_init_``.
    OFFSET_ACTIVE = (1.0, 0.5)  # (weight variance * C, bias std)
    MASK_ACTIVE = (0.25, 0.2)

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if channels % group:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        if stride != 1:
            raise ValueError("only stride 1 is supported: the offsets are predicted at the input resolution")
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.offset_scale = offset_scale
        points = kernel_size * kernel_size
        # Modification 1: a bare depthwise conv (InternImage follows it with LayerNorm and GELU).
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels)
        )
        self.offset = _SamplingLinear(channels, group * points * 2, *self.OFFSET_ACTIVE)
        self.mask = _SamplingLinear(channels, group * points, *self.MASK_ACTIVE)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official ``_reset_parameters``: offset and mask all zero (branch silenced), projections Xavier."""
        for layer in (self.offset, self.mask):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def active_init_(self, generator: torch.Generator) -> None:
        """All-branches-active draw of the parameters only DCNv3 understands (the conformance randomisation).

        offset weight ~ N(0, 1/C), bias ~ N(0, 0.5²): offsets of about a pixel; mask weight ~ N(0, 0.25/C),
        bias ~ N(0, 0.2²): a non-zero raw mask. Other parameters follow the generic rules of ``activate_branches``.
        """
        self.offset.active_init_(generator)
        self.mask.active_init_(generator)

    def silenced_parameters(self) -> list[str]:
        """``["mask.weight", "mask.bias"]`` when the mask is exactly zero: the branch then outputs and passes zero."""
        if not self.mask.weight.detach().any() and not self.mask.bias.detach().any():
            return ["mask.weight", "mask.bias"]
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, H, W, C) channels-last, already normalised by the block; returns (N, H', W', C)."""
        value = self.input_proj(x)
        features = self.dw_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        offset = self.offset(features)
        mask = self.mask(features)  # Modification 2: raw, no softmax over the points of a group
        out = dcnv3_core(
            value, offset, mask, self.group, self.kernel_size, self.stride, self.pad, self.dilation, self.offset_scale
        )
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}"
