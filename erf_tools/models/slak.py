"""SLaK: ConvNeXt with sparse, decomposed 51x51 kernels.

Liu et al., "More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51 using Sparsity", ICLR 2023
(arXiv 2207.03620). Parameter names follow the official code (``VITA-Group/SLaK`` ``models/SLaK.py``) so its
checkpoints load with ``strict=True``.

The block is ConvNeXt's with the 7x7 depthwise conv replaced by ``large_kernel``: in the released models (``Decom``)
the K x K kernel (K = 51, 49, 47, 13 in stages 1-4) is decomposed into two parallel rectangles, ``LoRA1`` (K x k) and
``LoRA2`` (k x K), plus a ``small_conv`` k x k (k = 5), each depthwise with its own BN, summed. Widths are the
ConvNeXt widths times ``width_factor`` 1.3, truncated (96 -> 124). Sparse training leaves about 40 % zeros in every
conv and linear weight of the released files; they are dense tensors and load as such.

Differences from the official code, none of which changes state-dict keys or (beyond float rounding) eval outputs:

* The official large-kernel conv is a CUDA-only implicit-GEMM op that pads each axis by its own half-size
  (``kh // 2``, ``kw // 2``); here it is ``nn.Conv2d`` with exactly that padding. (Giving ``nn.Conv2d`` the padding
  the official ``conv_bn`` passes, K // 2 on both axes, would make LoRA1 and LoRA2 return maps of different sizes.)
* Every BN is ``nn.BatchNorm2d``; the official file hard-codes ``SyncBatchNorm``, which in eval mode computes the same
  and has the same keys.
* ``forward_features`` returns the **spatial** ``stages[3]`` output (the ERF target; the official method returns the
  pooled, normalised vector); ``forward_head`` pools, normalises and classifies, so ``model(x)`` equals the official
  logits.
* ``drop_path_rate`` defaults to 0 (the README trains T/S/B with 0.1/0.4/0.5).
* ``structural_reparam()`` merges the parallel kernels into one K x K conv (``lkb_reparam``). The official code has
  no merge for the decomposed kernels; the sum of centred, zero-padded, stride-1 depthwise convs is one such conv,
  so the merge is exact in real arithmetic (eval mode, BN folded).
* ``fft_large_kernel`` computes the large depthwise convs through FFTs (same values to float rounding). On CPU a
  direct 51x51 depthwise conv costs ~100x its FFT at 128x128 (and the 5x51 strip ~8x); measured with torch 2.14.1,
  1 thread, 32 channels: 51x51 1030 ms direct / 9 ms FFT, 5x51 115 / 14 ms, 51x5 10 / 16 ms, 13x13 3 / 12 ms.
  ``measure_erf(fast=True)`` gets the same effect without the flag: it merges the kernels and switches the merged
  51/49/47-px convs to FFTs.

The ERF layer is the stage-4 output before the global mean, the final LayerNorm and the head (``erf_target =
"stages.3"``). SLaK's released ERF script returns the pooled vector and cannot index a centre unit, so the layer of
the paper's figure is inferred from the RepLKNet script it was adapted from.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from erf_tools.models.common import unwrap_checkpoint
from erf_tools.layers.staged import MeanNormHeadBackbone
from erf_tools.layers.reparam import bn_from_state_dict, fold_bn, merge_kernels
from erf_tools.layers.fft_conv import FFT_DEPTHWISE_MIN_KERNEL, FftMode, check_fft_mode, fft_depthwise_conv2d

__all__ = ["SLaK", "SLaKBlock", "DecomposedLargeKernelConv", "checkpoint_filter_fn", "merge_state_dict"]

NORM_EPS = 1e-6
#: Names of the parallel branches of ``large_kernel``, in official state-dict order.
BRANCHES = ("LoRA1", "LoRA2", "lkb_origin", "small_conv")


def _depthwise(channels: int, kernel: tuple[int, int], bias: bool = False) -> nn.Conv2d:
    """Stride-1 depthwise conv padded by each axis' own half-size, so the output has the input's size."""
    return nn.Conv2d(channels, channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=channels, bias=bias)


def _conv_bn(channels: int, kernel: tuple[int, int], bn: bool) -> nn.Sequential:
    """The official ``conv_bn``: children ``conv`` (no bias) and, with ``bn``, ``bn``."""
    branch = nn.Sequential()
    branch.add_module("conv", _depthwise(channels, kernel))
    if bn:
        branch.add_module("bn", nn.BatchNorm2d(channels))
    return branch


class DecomposedLargeKernelConv(nn.Module):
    """SLaK's ``large_kernel`` (official class ``ReparamLargeKernelConv``): parallel depthwise conv+BN branches.

    * ``decom=True`` (released models): ``LoRA1`` (K x k) + ``LoRA2`` (k x K) [+ ``small_conv`` k x k when k < K];
    * ``decom=False``: ``lkb_origin`` (K x K) [+ ``small_conv``];
    * merged (``merge_kernel()`` or ``small_kernel_merged=True``): one K x K conv with bias, ``lkb_reparam``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        small_kernel: int,
        decom: bool = True,
        bn: bool = True,
        small_kernel_merged: bool = False,
        fft: FftMode = False,
    ) -> None:
        super().__init__()
        if decom and small_kernel >= kernel_size:
            raise ValueError(f"decomposed kernels need k < K (K x k and k x K strips), got K={kernel_size}, "
                             f"k={small_kernel}")
        # k >= K means "no small kernel" (the official ConvNeXt baseline passes k = 100)
        if kernel_size % 2 == 0 or (small_kernel < kernel_size and small_kernel % 2 == 0):
            raise ValueError(f"SLaK kernels must be odd to be same-padded, got K={kernel_size}, k={small_kernel}")
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.fft = check_fft_mode(fft)
        if small_kernel_merged:
            self.lkb_reparam = _depthwise(channels, (kernel_size, kernel_size), bias=True)
            return
        if decom:
            self.LoRA1 = _conv_bn(channels, (kernel_size, small_kernel), bn)  # noqa: N815 - official name
            self.LoRA2 = _conv_bn(channels, (small_kernel, kernel_size), bn)  # noqa: N815 - official name
        else:
            self.lkb_origin = _conv_bn(channels, (kernel_size, kernel_size), bn)
        if small_kernel < kernel_size:
            self.small_conv = _conv_bn(channels, (small_kernel, small_kernel), bn)

    @property
    def merged(self) -> bool:
        return hasattr(self, "lkb_reparam")

    def _conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        if self.fft is True or (
                self.fft == "auto" and x.device.type == "cpu" and max(conv.kernel_size) >= FFT_DEPTHWISE_MIN_KERNEL):
            return fft_depthwise_conv2d(x, conv.weight, conv.bias)
        return conv(x)

    def _branch(self, x: torch.Tensor, branch: nn.Sequential) -> torch.Tensor:
        out = self._conv(x, branch.conv)
        return branch.bn(out) if hasattr(branch, "bn") else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._conv(x, self.lkb_reparam)
        out = None
        for name in BRANCHES:
            if hasattr(self, name):
                y = self._branch(x, getattr(self, name))
                out = y if out is None else out + y
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K x K kernel and bias that reproduce the eval-mode sum of every branch."""
        branches = [getattr(self, n) for n in BRANCHES if hasattr(self, n)]
        return merge_kernels([fold_bn(b.conv.weight, getattr(b, "bn", None)) for b in branches], self.kernel_size)

    def merge_kernel(self) -> None:
        """Replace the branches by ``lkb_reparam`` (in place; a no-op when already merged)."""
        if self.merged:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        first = next(getattr(self, n) for n in BRANCHES if hasattr(self, n)).conv
        merged = _depthwise(first.in_channels, (self.kernel_size, self.kernel_size), bias=True)
        merged = merged.to(device=kernel.device, dtype=kernel.dtype)
        merged.weight.data, merged.bias.data = kernel, bias
        merged.requires_grad_(first.weight.requires_grad)  # a frozen model stays frozen
        for name in BRANCHES:
            if hasattr(self, name):
                delattr(self, name)
        self.lkb_reparam = merged

    reparameterize = merge_kernel  # the hook name timm's ``reparameterize_model`` calls


class SLaKBlock(nn.Module):
    """x + DropPath(gamma * pwconv2(GELU(pwconv1(LN(large_kernel(x)))))), the MLP channels-last (official ``Block``)."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        small_kernel: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        decom: bool = True,
        bn: bool = True,
        small_kernel_merged: bool = False,
        fft: FftMode = False,
    ) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value)) if layer_scale_init_value > 0 else None
        self.large_kernel = DecomposedLargeKernelConv(
            dim, kernel_size, small_kernel, decom, bn, small_kernel_merged, fft)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.large_kernel(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class SLaK(MeanNormHeadBackbone):
    """SLaK: ConvNeXt layout (4x4/4 stem, LN + 2x2/2 downsamplers, four stages) with :class:`SLaKBlock` s.

    Constructor arguments keep the official names (``kernel_size``, ``width_factor``, ``Decom``, ``bn``), so the
    official keyword arguments build the same model.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0: none).
        depths: blocks per stage.
        dims: ConvNeXt widths before ``width_factor``.
        drop_path_rate: stochastic depth, linear over all blocks.
        layer_scale_init_value: initial block layer scale (1e-6 silences every branch at init; <= 0: none).
        head_init_scale: factor on the classifier weight and bias after init.
        kernel_size: [K_1, K_2, K_3, K_4, k]: the large kernel of each stage, then the short side of the strips and
            the small square kernel. The released models use [51, 49, 47, 13, 5].
        width_factor: widths are ``int(d * width_factor)`` (1.3 in the released models).
        Decom: decomposed kernels (K x k + k x K); falsy builds the K x K ``lkb_origin`` (the constructor's official
            default is None, i.e. not decomposed).
        bn: a BN after every large-kernel branch.
        small_kernel_merged: build the merged ``lkb_reparam`` layout directly.
        fft_large_kernel: FFTs for the large depthwise convs: True, "auto" (CPU, a side >= ``FFT_DEPTHWISE_MIN_KERNEL``)
            or False (direct convolution, the official arithmetic).
        global_pool: ``"avg"`` or ``""`` (no pooling).
        drop_rate: dropout before the classifier (not in the official model).
    """

    erf_target = "stages.3"
    nchw_error = "SLaK intermediates are NCHW only"
    final_norm_name = "norm"  # LayerNorm on the pooled vector

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        kernel_size: Sequence[int] = (51, 49, 47, 13, 5),
        width_factor: float = 1.0,
        Decom: bool | None = None,  # noqa: N803 - official argument name
        bn: bool = True,
        small_kernel_merged: bool = False,
        fft_large_kernel: FftMode = False,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4 or len(kernel_size) != 5:
            raise ValueError("SLaK has four stages: depths and dims need 4 entries, kernel_size 5 (K_1..K_4, k)")
        self._check_pool(global_pool)
        dims = [int(d * width_factor) for d in dims]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]

        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=NORM_EPS))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=NORM_EPS), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: also under meta
        self.stages = nn.ModuleList()
        self.feature_info = []
        first = 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            self.stages.append(nn.Sequential(*[
                SLaKBlock(dim, kernel_size[i], kernel_size[-1], rates[first + j], layer_scale_init_value,
                          bool(Decom), bn, small_kernel_merged, fft_large_kernel)
                for j in range(depth)]))
            first += depth
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.init_head(dims[-1], num_classes, drop_rate, head_init_scale, NORM_EPS)

    def _large_kernels(self) -> list[DecomposedLargeKernelConv]:
        return [m for m in self.modules() if isinstance(m, DecomposedLargeKernelConv)]

    def structural_reparam(self) -> SLaK:
        """Merge every block's parallel kernels into one BN-folded K x K conv (``lkb_reparam``), in place.

        Eval-mode outputs are unchanged up to float rounding (so is the ERF); irreversible. Returns the model.
        """
        for module in self._large_kernels():
            module.merge_kernel()
        return self

    @property
    def is_merged(self) -> bool:
        """Whether the large kernels are in the merged (``lkb_reparam``) layout."""
        return all(m.merged for m in self._large_kernels())

    def set_fft_large_kernel(self, enable: FftMode = True) -> None:
        """Switch the FFT path of the large depthwise convs (same weights, same outputs to float rounding)."""
        check_fft_mode(enable)
        for module in self._large_kernels():
            module.fft = enable


def merge_state_dict(state_dict: Mapping[str, torch.Tensor], eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """A training-layout state dict in the merged layout (``large_kernel.lkb_reparam``), key order kept.

    The tensor-level twin of :meth:`SLaK.structural_reparam`, to load an unmerged checkpoint into a merged model.
    """
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in state_dict.items():
        head, sep, tail = key.partition(".large_kernel.")
        if not sep or tail.split(".", 1)[0] not in BRANCHES:
            out[key] = value
            continue
        prefix = f"{head}.large_kernel."
        if prefix in done:
            continue
        done.add(prefix)
        branches = []
        for name in BRANCHES:
            weight = state_dict.get(f"{prefix}{name}.conv.weight")
            if weight is None:
                continue
            branches.append(fold_bn(weight, bn_from_state_dict(state_dict, f"{prefix}{name}.bn"), eps=eps))
        size = max(max(k.shape[-2:]) for k, _ in branches)
        out[f"{prefix}lkb_reparam.weight"], out[f"{prefix}lkb_reparam.bias"] = merge_kernels(branches, size)
    return out


#: An earlier revision of the official ``models/SLaK.py`` named the two strips ``Decom1`` / ``Decom2``.
_OLD_BRANCH_NAMES = {".large_kernel.Decom1.": ".large_kernel.LoRA1.", ".large_kernel.Decom2.": ".large_kernel.LoRA2."}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: SLaK) -> dict[str, torch.Tensor]:
    """Prepare an official SLaK checkpoint for a strict load into ``model``.

    Unwraps ``{'model': ...}`` training checkpoints (``utils.save_model``), renames the ``Decom1``/``Decom2`` keys of
    the earlier official revision, drops the classifier for a headless model, and reconciles the layouts: a merged
    checkpoint merges the model in place first (its branches cannot be recovered from their sum); an unmerged one is
    folded for a merged model (:func:`merge_state_dict`).
    """
    state = unwrap_checkpoint(state_dict)
    for old, new in _OLD_BRANCH_NAMES.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    if not isinstance(getattr(model, "head", None), nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    checkpoint_merged = any(".large_kernel.lkb_reparam." in k for k in state)
    checkpoint_unmerged = any(f".large_kernel.{b}." in k for k in state for b in BRANCHES)
    if checkpoint_merged and not model.is_merged:
        model.structural_reparam()
    elif checkpoint_unmerged and model.is_merged:
        state = merge_state_dict(state)
    return state


def _create_slak(variant: str, pretrained: bool = False, **kwargs: Any) -> SLaK:
    return build_model_with_cfg(
        SLaK, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # downsample_layers and stages are separate ModuleLists, so features come from forward_intermediates
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(drive_id: str, **kwargs: Any) -> dict[str, Any]:
    # Eval transform (datasets.py, ConvNeXt's): below 384 resize to size/0.875 then centre-crop, bicubic.
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "paper_ids": "arXiv:2207.03620",
        "paper_name": "More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51 using Sparsity",
        "origin_url": "https://github.com/VITA-Group/SLaK",
        "notes": (f"300-epoch ImageNet-1K release, Google Drive id {drive_id} (the README gives no file name); "
                  "download it and pass the path (erf_tools.weights.load_checkpoint, or pretrained_cfg_overlay="
                  "dict(file=...)); about 40 % of its conv/linear weights are zero (sparse training)",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "slak_t.in1k": _cfg("1Iut2f5FMS_77jGPYoUJDQzDIXOsax1u4"),
    "slak_s.in1k": _cfg("1etM6KQbnlsgDAZ37adsQJ3UI8Bbv2AVe"),
    "slak_b.in1k": _cfg("1duUxUD3RSblQ6eDHd0n-u0aulwGypf1j"),
})

#: The configuration of the README training commands of the released models.
_RELEASED = dict(kernel_size=(51, 49, 47, 13, 5), width_factor=1.3, Decom=True, bn=True)


@register_model
def slak_t(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-T (50.7M dense parameters; ~30M nonzero in the sparse release)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **_RELEASED)
    return _create_slak("slak_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def slak_s(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-S (91.1M dense parameters; ~55M nonzero in the sparse release)."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **_RELEASED)
    return _create_slak("slak_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def slak_b(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-B (158.0M dense parameters; ~95M nonzero in the sparse release)."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **_RELEASED)
    return _create_slak("slak_b", pretrained=pretrained, **dict(model_args, **kwargs))
