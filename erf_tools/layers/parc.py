"""ParC, the position-aware circular convolution (Zhang et al., "ParC-Net", ECCV 2022), in its spatial and FFT forms.

ParC mixes tokens along a whole image axis: a circular cross-correlation whose kernel is as long as the feature map,
after adding a learnable position embedding ``pe`` that varies along that axis. Two exact forms of the same operator
(per channel c, direction ``'H'``, length L = H):

* spatial (the official form): ``x_p = x + pe``; append the first L-1 rows after the last one and run a valid
  (L, 1) convolution: ``y[c, i, j] = b[c] + sum_k w[c, k] * x_p[c, (i + k) mod L, j]``;
* Fast-ParC (Yang et al., arXiv 2210.04020): ``y = irfft(rfft(x_p) * conj(rfft(w)), n=L) + b``. The ``conj`` is
  required because the spatial op is a cross-correlation, not a convolution.

The stored kernel and position embedding are the papers' *meta kernel*, resized to the runtime feature length by
bilinear interpolation with ``align_corners=True`` (the identity at the native size). The networks built from it are
in :mod:`erf_tools.models.parc`.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["FFT_MIN_LENGTH", "CircularCorrelationFFT", "Direction", "ParC", "ParCPath", "parc_kernel",
           "set_parc_path"]

ParCPath = Literal["auto", "spatial", "fft"]
Direction = Literal["H", "W"]

#: Shortest axis length (runtime feature size) from which the ``'auto'`` path uses Fast-ParC, per operator kind.
#: Measured with ``bench/bench_parc.py --clock cpu`` on the 2-core CPU (bench/RESULTS.md, "ParC spatial vs FFT
#: crossover (CPU)"): for forward + input gradient (the ERF workload) FFT wins at every measured L >= 16 for the
#: depthwise pairs (C = 96, 192, 384) and at every L >= 12 for the dense ones (C = 128, 256); below that the two
#: are within about 10-20 % (depthwise) or spatial wins (dense, up to 2x at L = 7). So the native 224 maps (L = 14, 7) keep
#: the official spatial arithmetic in ParC-ConvNeXt, and the 1024 maps (L = 64, 32) take the FFT path everywhere.
FFT_MIN_LENGTH: dict[str, int] = {"depthwise": 16, "dense": 12}


def parc_kernel(meta: torch.Tensor, length: int, direction: Direction) -> torch.Tensor:
    """Resize a meta kernel or position embedding along its ParC axis to ``length`` taps.

    The meta-kernel mechanism of ParC-Net/EdgeFormer: bilinear interpolation with ``align_corners=True`` (endpoints
    kept, linear in between), no gain correction. Returns ``meta`` itself when the length already matches, so the
    native size is bit-for-bit the official static kernel.
    """
    axis = 2 if direction == "H" else 3
    if meta.shape[axis] == length:
        return meta
    size = (length, 1) if direction == "H" else (1, length)
    return F.interpolate(meta, size=size, mode="bilinear", align_corners=True)


def _spectral_mix(x_f: torch.Tensor, k_f: torch.Tensor, axis: int, adjoint: bool = False) -> torch.Tensor:
    """Per-frequency channel mixing: ``Y[o] = Σ_c X[c]·K[o, c]`` (dense) or ``Y[c] = X[c]·K[c]`` (depthwise,
    ``k_f`` of shape (C, 1, F)); ``adjoint`` sums over the output channel instead (the transposed mixing)."""
    if k_f.shape[1] == 1 and k_f.shape[0] == x_f.shape[1]:  # depthwise
        k = k_f[:, 0, :, None] if axis == 2 else k_f[:, 0, None, :]
        return x_f * k
    if axis == 2:
        return torch.einsum("bofw,ocf->bcfw" if adjoint else "bcfw,ocf->bofw", x_f, k_f)
    return torch.einsum("bohf,ocf->bchf" if adjoint else "bchf,ocf->bohf", x_f, k_f)


class CircularCorrelationFFT(torch.autograd.Function):
    """Fast-ParC core: circular cross-correlation along ``axis`` (2 or 3) by real FFTs, with an FFT backward.

    Forward ``y = irfft(rfft(x) · conj(rfft(w)), n=L)``, ``w`` of shape (C_out, C_in/groups, L). The backward uses
    the adjoint directly (a circular *convolution* with the same kernel, ``irfft(rfft(g) · rfft(w))``), and for the
    kernel ``irfft(Σ conj(rfft(g)) · rfft(x))``; generic autograd through ``rfft``/``irfft`` is up to ~1.7x slower
    here (bench/RESULTS.md) because it materialises full complex spectra. Depthwise when ``w`` has one input channel per group
    and C_out = C_in; dense otherwise.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:  # noqa: D102
        length = x.shape[axis]
        w_f = torch.fft.rfft(weight, dim=-1)
        y = torch.fft.irfft(_spectral_mix(torch.fft.rfft(x, dim=axis), w_f.conj(), axis), n=length, dim=axis)
        ctx.axis = axis
        ctx.save_for_backward(x if weight.requires_grad else None, w_f)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):  # noqa: D102
        x, w_f = ctx.saved_tensors
        axis = ctx.axis
        length = grad_y.shape[axis]
        g_f = torch.fft.rfft(grad_y, dim=axis)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfft(_spectral_mix(g_f, w_f, axis, adjoint=True), n=length, dim=axis)
        if ctx.needs_input_grad[1]:
            x_f = torch.fft.rfft(x, dim=axis)
            other = 3 if axis == 2 else 2
            if w_f.shape[1] == 1 and w_f.shape[0] == x.shape[1]:  # depthwise: (C, F), summed over batch and other axis
                cross = (g_f.conj() * x_f).sum(dim=(0, other)).unsqueeze(1)
            elif axis == 2:
                cross = torch.einsum("bofw,bcfw->ocf", g_f.conj(), x_f)
            else:
                cross = torch.einsum("bohf,bchf->ocf", g_f.conj(), x_f)
            grad_w = torch.fft.irfft(cross, n=length, dim=-1)
        return grad_x, grad_w, None


class ParC(nn.Module):
    """Position-aware circular convolution along one axis (the official ``ParC_operator`` / ``gcc_Conv2d``).

    Keys match the official ParC ConvNets: ``pe`` (1, C, K, 1) for ``'H'`` or (1, C, 1, K) for ``'W'``, and
    ``gcc_conv.{weight,bias}`` with kernel (K, 1) / (1, K). ``groups=channels`` gives the depthwise ParC of
    ParC-ConvNeXt, ``groups=1`` the dense ParC of ParC-ResNet50. ``path`` selects the implementation: ``'spatial'``
    (official wrap-and-convolve), ``'fft'`` (Fast-ParC) or ``'auto'`` (by :data:`FFT_MIN_LENGTH`).

    ``gcc_conv`` only holds the parameters under their official names; it is never called as a module (its input
    would be the wrapped 2L-1 map and its kernel the interpolated one), so hooks that trace convolution geometry,
    such as the engine's receptive-field-centre log, see no centred conv here: ParC has no RF centre along its axis.
    """

    def __init__(
        self,
        channels: int,
        direction: Direction,
        meta_kernel_size: int,
        groups: int | None = None,
        use_pe: bool = True,
        path: ParCPath = "auto",
    ) -> None:
        super().__init__()
        if direction not in ("H", "W"):
            raise ValueError(f"direction must be 'H' (along the height) or 'W' (along the width), not {direction!r}")
        groups = channels if groups is None else groups
        if groups not in (1, channels):
            raise ValueError(f"ParC is depthwise (groups={channels}) or dense (groups=1), got groups={groups}")
        self.direction = direction
        self.meta_kernel_size = meta_kernel_size
        self.path = path
        kernel = (meta_kernel_size, 1) if direction == "H" else (1, meta_kernel_size)
        if use_pe:
            self.pe = nn.Parameter(torch.empty(1, channels, *kernel))
            if not self.pe.is_meta:
                trunc_normal_(self.pe, std=0.02)
        else:
            self.register_parameter("pe", None)
        self.gcc_conv = nn.Conv2d(channels, channels, kernel_size=kernel, groups=groups, bias=True)

    @property
    def depthwise(self) -> bool:
        return self.gcc_conv.groups > 1 or self.gcc_conv.in_channels == 1

    @torch.no_grad()
    def active_init_(self, generator: torch.Generator) -> None:
        """Draw ``pe`` ~ N(0, 0.5²), the all-branches-active probe init of the conformance fixtures.

        The trained-scale init (std 0.02) makes the position embedding invisible in a random-init ERF; 0.5 makes it
        comparable to the activations. Called by :func:`erf_tools.weights.activate_branches`.
        """
        if self.pe is not None:
            self.pe.copy_(torch.randn(self.pe.shape, generator=generator) * 0.5)

    def instance_kernel(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel and position embedding for a runtime axis length (meta-kernel interpolation)."""
        weight = parc_kernel(self.gcc_conv.weight, length, self.direction)
        pe = None if self.pe is None else parc_kernel(self.pe, length, self.direction)
        return weight, pe

    def use_fft(self, length: int) -> bool:
        """Whether this call takes the Fast-ParC path."""
        if self.path == "auto":
            return length >= FFT_MIN_LENGTH["depthwise" if self.depthwise else "dense"]
        if self.path not in ("spatial", "fft"):
            raise ValueError(f"ParC path must be 'auto', 'spatial' or 'fft', got {self.path!r}")
        return self.path == "fft"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[2] if self.direction == "H" else x.shape[3]
        weight, pe = self.instance_kernel(length)
        if pe is not None:
            x = x + pe  # broadcast over the other axis (the official code expands pe to K x K)
        if self.use_fft(length):
            return self._forward_fft(x, weight)
        return self._forward_spatial(x, weight)

    def _forward_spatial(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.direction == "H":
            x = torch.cat((x, x[:, :, :-1, :]), dim=2)
        else:
            x = torch.cat((x, x[:, :, :, :-1]), dim=3)
        return F.conv2d(x, weight, self.gcc_conv.bias, groups=self.gcc_conv.groups)

    def _forward_fft(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        axis = 2 if self.direction == "H" else 3
        dtype = x.dtype
        if dtype not in (torch.float32, torch.float64):  # half / bfloat16 (autocast): FFTs need single precision
            x = x.float()
        y = CircularCorrelationFFT.apply(x, weight.flatten(2).to(x.dtype), axis)
        return (y + self.gcc_conv.bias.view(1, -1, 1, 1).to(x.dtype)).to(dtype)

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else "dense"
        return f"direction={self.direction!r}, meta_kernel_size={self.meta_kernel_size}, {kind}, path={self.path!r}"


def set_parc_path(model: nn.Module, path: ParCPath) -> nn.Module:
    """Force every ParC operator of ``model`` onto one path (``'spatial'``, ``'fft'``) or back to ``'auto'``."""
    if path not in ("auto", "spatial", "fft"):
        raise ValueError(f"ParC path must be 'auto', 'spatial' or 'fft', got {path!r}")
    for module in model.modules():
        if isinstance(module, ParC):
            module.path = path
    return model


# ---------------------------------------------------------------------------------------------------------------------
# ParC-ConvNeXt
