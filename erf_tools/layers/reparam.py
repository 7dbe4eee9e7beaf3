"""Kernel arithmetic of structural re-parameterisation, shared by SLaK and UniRepLKNet.

Parallel depthwise branches that are all stride 1, zero-padded to keep the map size and centred on the same pixel
add up to one depthwise conv: pad each (BN-folded) kernel with zeros to the largest size, centred, and sum the
kernels and the biases (Ding et al., RepLKNet, CVPR 2022, Sec. 3; UniRepLKNet, CVPR 2024, Sec. 3.2). A dilated
k x k kernel with rate r is the r(k-1)+1 kernel with its taps spread r apart and zeros in between. Exact in real
arithmetic, for eval-mode BN (running statistics).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from erf_tools.layers.batchnorm import fuse_bn

__all__ = ["bn_from_state_dict", "bn_statistics", "centre_pad", "dilated_to_dense", "fold_bn", "merge_kernels"]


def bn_statistics(bn: nn.modules.batchnorm._BatchNorm | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weight``, ``bias``, ``running_mean``, ``running_var`` of a BN module (or of a mapping holding them)."""
    return {name: getattr(bn, name) if isinstance(bn, nn.Module) else bn[name]
            for name in ("weight", "bias", "running_mean", "running_var")}


def bn_from_state_dict(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor] | None:
    """The statistics of the BN stored under ``prefix`` (``prefix.weight``, ...) in a state dict; None if absent."""
    if f"{prefix}.weight" not in state:
        return None
    return {name: state[f"{prefix}.{name}"] for name in ("weight", "bias", "running_mean", "running_var")}


def fold_bn(
    weight: torch.Tensor,
    bn: nn.modules.batchnorm._BatchNorm | Mapping[str, torch.Tensor] | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``BN(conv(x))`` as one conv: ``W·γ/σ`` and ``β + (b − μ)·γ/σ`` (no bias: b = 0).

    ``bn`` None returns the conv itself (a missing bias as zeros). A module's own ``eps`` wins over ``eps``.
    """
    if bn is None:
        return weight, bias if bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(bn, nn.Module):
        eps = bn.eps
    stats = bn_statistics(bn)
    if bias is not None:  # a conv bias b acts like a shifted mean: (Wx + b − μ) = (Wx − (μ − b))
        stats["running_mean"] = stats["running_mean"] - bias
    return fuse_bn(weight, stats, eps)


def centre_pad(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad an odd (kh, kw) kernel to (size, size), centred: the same-padded conv then computes the same map."""
    pad_h, pad_w = (size - kernel.shape[-2]) // 2, (size - kernel.shape[-1]) // 2
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"a {tuple(kernel.shape[-2:])} kernel does not fit into {size}x{size}")
    return F.pad(kernel, [pad_w, pad_w, pad_h, pad_h])


def merge_kernels(
    branches: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One size x size kernel and bias equal to the sum of parallel centred depthwise (kernel, bias) branches."""
    kernel = sum(centre_pad(k, size) for k, _ in branches)
    bias = sum(b for _, b in branches)
    return kernel, bias


def dilated_to_dense(kernel: torch.Tensor, rate: int) -> torch.Tensor:
    """The non-dilated equivalent of a (C, 1, k, k) kernel with dilation ``rate``: side r(k−1)+1, taps r apart."""
    if rate == 1:
        return kernel
    k_h, k_w = kernel.shape[-2:]
    dense = kernel.new_zeros(*kernel.shape[:-2], rate * (k_h - 1) + 1, rate * (k_w - 1) + 1)
    dense[..., ::rate, ::rate] = kernel
    return dense
