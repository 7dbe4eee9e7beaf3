"""Same-padded depthwise convolutions computed through FFTs, and the switch that makes a model use them.

A direct K×K depthwise conv costs O(K²) per output pixel and PyTorch's CPU depthwise kernels slow down sharply above
13×13; through FFTs the cost is O(log HW) per pixel whatever K. RepLKNet (Ding et al., CVPR 2022) and SLaK (Liu et
al., ICLR 2023) have 27–51 px kernels, where the FFT is several times faster on CPU (``bench/RESULTS.md``); 7–13 px
kernels (ConvNeXt, UniConvNet, Conv2Former) stay direct. The result equals the direct convolution to float rounding.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal, Union

import torch
from torch import nn

__all__ = ["FFT_DEPTHWISE_MIN_KERNEL", "FftMode", "check_fft_mode", "fft_depthwise_conv2d", "inside_fft_convolution",
           "use_fft_depthwise"]

#: The one crossover of this package: depthwise kernels at least this large are computed by FFT when an FFT path is
#: asked for ("auto" modes, ``fast=True``). Measured with torch 2.14.1 on the 2-core CPU
#: (``bench/bench_replknet.py --crossover``, 1 and 2 threads): the direct conv beats the FFT 1.7-4.5x at 13x13 for
#: every map from 7 to 256; from 15x15 up the FFT wins 1.3-26x, because PyTorch's CPU depthwise path slows down
#: sharply above 13x13. The crossover is a kernel size, not a map size.
FFT_DEPTHWISE_MIN_KERNEL = 15

#: How a large-kernel module computes its depthwise convs: FFT always, never, or ``"auto"`` (CPU, kernels of at least
#: :data:`FFT_DEPTHWISE_MIN_KERNEL`).
FftMode = Union[bool, Literal["auto"]]


def check_fft_mode(fft: FftMode) -> FftMode:
    """``fft`` itself if it is True, False or ``"auto"``; ValueError otherwise."""
    if fft not in (True, False, "auto"):
        raise ValueError(f"fft_large_kernel must be True, False or 'auto', got {fft!r}")
    return fft


#: Per-thread depth of FFT-computed convolutions in progress: their internal operators (FFTs, padding, slicing)
#: amount to one zero-padded convolution, a local operator for the engine's input windows.
_FFT_CONVOLUTION = threading.local()


def inside_fft_convolution() -> bool:
    """Whether the calling thread is inside an FFT-computed convolution of :func:`use_fft_depthwise`."""
    return bool(getattr(_FFT_CONVOLUTION, "depth", 0))


def _fft_length(n: int) -> int:
    """Smallest 5-smooth integer >= n: FFT lengths with only factors 2, 3, 5 are the fast ones."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same-padded, stride-1 depthwise cross-correlation computed with real FFTs; equals
    ``F.conv2d(x, weight, bias, padding=K // 2, groups=C)`` to float rounding, for odd K.

    Cost is O(H·W·log(H·W)) per channel instead of O(H·W·K²), which pays for RepLKNet's 27–31 px kernels on CPU at
    ERF input sizes. Autograd flows through ``torch.fft``, so input gradients (the ERF) are exact as well.

    The transform length only needs ``H + K//2`` (not ``H + K − 1``): circular wrap-around then lands in the
    first ``K//2`` outputs of the full convolution, which the "same" window discards.
    """
    height, width = x.shape[-2:]
    k_h, k_w = weight.shape[-2:]
    p_h, p_w = k_h // 2, k_w // 2
    size = (_fft_length(max(height + p_h, k_h)), _fft_length(max(width + p_w, k_w)))
    # correlation = convolution with the flipped kernel; the "same" window starts at the kernel radius
    spectrum = torch.fft.rfft2(x, s=size) * torch.fft.rfft2(weight.flip(-1, -2).squeeze(1), s=size)
    out = torch.fft.irfft2(spectrum, s=size)[..., p_h:p_h + height, p_w:p_w + width]
    if bias is not None:
        out = out + bias.reshape(-1, 1, 1)
    return out.contiguous()


def _fft_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Conv2d.forward`` of an FFT-computed depthwise conv (see :func:`use_fft_depthwise`)."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    _FFT_CONVOLUTION.depth = getattr(_FFT_CONVOLUTION, "depth", 0) + 1
    try:
        with torch.autocast(x.device.type, enabled=False):  # no reduced-precision FFTs on CPUs; fp32 spectra
            out = fft_depthwise_conv2d(x.float().contiguous(), self.weight.float(),
                                       None if self.bias is None else self.bias.float())
    finally:
        _FFT_CONVOLUTION.depth -= 1
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(x.dtype)


def use_fft_depthwise(model: nn.Module, min_kernel_size: int = FFT_DEPTHWISE_MIN_KERNEL, *, exclude: Sequence[str] = ()) -> list[str]:
    """Compute stride-1, 'same'-padded depthwise convolutions with kernels of at least ``min_kernel_size`` through
    FFTs, in place (an instance-level ``forward``; module names and hooks are unchanged); return their names.

    Why: a direct K×K depthwise conv costs O(K²) per output pixel and its CPU backward kernels are slow for large K;
    through FFTs the cost is O(log HW) per pixel whatever K (see :data:`FFT_DEPTHWISE_MIN_KERNEL`). The result is
    the same to float32 rounding.
    """
    changed = []
    for name, module in model.named_modules():
        if type(module) is not nn.Conv2d or name in exclude:
            continue
        kh, kw = module.kernel_size
        padding = module.padding if module.padding != "same" else (kh // 2, kw // 2)
        if (module.groups == module.in_channels == module.out_channels and tuple(module.stride) == (1, 1)
                and tuple(module.dilation) == (1, 1) and module.padding_mode == "zeros" and kh % 2 and kw % 2
                and tuple(padding) == (kh // 2, kw // 2) and max(kh, kw) >= min_kernel_size):
            module.forward = _fft_conv_forward.__get__(module, nn.Conv2d)
            changed.append(name)
    return changed
