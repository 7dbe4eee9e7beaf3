"""RepLKNet: large depthwise kernels with structural re-parameterisation.

Ding et al., "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs", CVPR 2022
(arXiv 2203.06717). Parameter names follow the official
PyTorch code (``DingXiaoH/RepLKNet-pytorch`` ``replknet.py``) so its checkpoints load with ``strict=True``, in
both the training-time layout (``large_kernel.lkb_origin`` + ``large_kernel.small_conv``) and the re-parameterised
layout (``large_kernel.lkb_reparam``).

Differences from the official code, none of which changes state-dict keys or (beyond float rounding) eval outputs:

* Every norm is a plain ``nn.BatchNorm2d``. The official ``use_sync_bn=True`` flips a module-level flag that is never
  reset, so every RepLKNet built later in the same process gets ``SyncBatchNorm`` whatever it asks for. In eval mode
  SyncBatchNorm computes exactly what BatchNorm2d computes (the ERF fixture checked this: max difference 0) and its
  keys are the same, so the flag is accepted and ignored here. For multi-GPU training use
  ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` explicitly.
* ``drop_path_rate`` defaults to 0 (the timm convention) rather than the factories' 0.3; pass it for training.
* The optional CUDA ``DepthWiseConv2dImplicitGEMM`` is not used. Instead ``fft_large_kernel`` can compute the large
  depthwise convolutions through FFTs (same result to float32 rounding): on CPU PyTorch's direct depthwise
  convolution leaves its fast path above 13x13, so ``"auto"`` (FFT for CPU kernels >= ``FFT_DEPTHWISE_MIN_KERNEL``, 15) makes the forward and input
  gradient of RepLKNet-31B 3x (2 threads) to 5x (1 thread) faster at the ERF size of 1024x1024 (``bench/RESULTS.md``).
  Input gradients through ~60 ReLUs amplify rounding: any two float32 paths differ (merged vs unmerged as well), and
  PyTorch's default init (BN beta = mean = 0) leaves whole depthwise channels exactly zero, where the direct conv
  returns 0 (ReLU gate shut) and the FFT +-1e-12 (gate open half the time). Measured on 31B at 224 against float64,
  relative L1 error of the input gradient, direct / FFT: 6e-7 / 6e-7 at default init when no gate flips (a flipped
  gate moves a few pixels by up to 0.13 % of the maximum), 3e-4 / 7e-4 with ``erf_tools.weights.activate_branches``.

The ERF quantity of the paper is the stage-4 output **before** the final BN (``forward_features``; module
``erf_target = "stages.3"``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

from erf_tools.layers.batchnorm import fuse_bn
from erf_tools.layers.fft_conv import FFT_DEPTHWISE_MIN_KERNEL, FftMode, check_fft_mode, fft_depthwise_conv2d
from erf_tools.models.common import unwrap_checkpoint

__all__ = ["RepLKNet", "ReparamLargeKernelConv", "merge_state_dict"]


class ConvBN(nn.Sequential):
    """Conv (no bias) → BatchNorm (→ ReLU): the official ``conv_bn`` / ``conv_bn_relu`` with children
    ``conv``, ``bn`` and ``nonlinear``, same-padded (``kernel_size // 2``) as everywhere in RepLKNet."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            groups: int = 1,
            act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        if act:
            self.nonlinear = nn.ReLU()


def _merge_branches(large: tuple[torch.Tensor, torch.Tensor], small: tuple[torch.Tensor, torch.Tensor] | None):
    """Add the BN-fused small kernel, zero-padded to the centre of the large one (both are same-padded, stride 1)."""
    kernel, bias = large
    if small is None:
        return kernel, bias
    small_kernel, small_bias = small
    pad = (kernel.shape[-1] - small_kernel.shape[-1]) // 2
    return kernel + F.pad(small_kernel, [pad] * 4), bias + small_bias


class ReparamLargeKernelConv(nn.Module):
    """Depthwise K×K conv+BN plus a parallel small k×k conv+BN (``lkb_origin`` + ``small_conv``), re-parameterisable
    into one K×K conv with bias (``lkb_reparam``).

    The small kernel helps optimisation of the large one during training (the paper's guideline 3); at inference
    both are linear and centred, so their sum is one kernel.
    """

    def __init__(
            self,
            channels: int,
            kernel_size: int,
            small_kernel: int | None = 5,
            small_kernel_merged: bool = False,
            fft: FftMode = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or (small_kernel is not None and (small_kernel % 2 == 0 or small_kernel > kernel_size)):
            raise ValueError(f"kernels must be odd with small <= large, got {kernel_size} and {small_kernel}")
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.fft = check_fft_mode(fft)
        if small_kernel_merged:
            self.lkb_reparam = nn.Conv2d(
                channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=True)
        else:
            self.lkb_origin = ConvBN(channels, channels, kernel_size, groups=channels)
            if small_kernel is not None:
                self.small_conv = ConvBN(channels, channels, small_kernel, groups=channels)

    @property
    def merged(self) -> bool:
        return hasattr(self, "lkb_reparam")

    def _large_conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        if self.fft is True or (
                self.fft == "auto" and x.device.type == "cpu" and self.kernel_size >= FFT_DEPTHWISE_MIN_KERNEL):
            return fft_depthwise_conv2d(x, conv.weight, conv.bias)
        return conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._large_conv(x, self.lkb_reparam)
        out = self.lkb_origin.bn(self._large_conv(x, self.lkb_origin.conv))
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single K×K kernel and bias that reproduce the eval-mode output of both branches."""
        small = fuse_bn(self.small_conv.conv.weight, self.small_conv.bn) if hasattr(self, "small_conv") else None
        return _merge_branches(fuse_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn), small)

    def merge_kernel(self) -> None:
        """Replace both branches by ``lkb_reparam`` (in place; a no-op when already merged)."""
        if self.merged:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        origin = self.lkb_origin.conv
        self.lkb_reparam = nn.Conv2d(
            origin.in_channels, origin.out_channels, self.kernel_size, padding=self.kernel_size // 2,
            groups=origin.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
        self.lkb_reparam.weight.data = kernel
        self.lkb_reparam.bias.data = bias
        # a frozen model (e.g. for input gradients only) stays frozen: no weight gradients for the new conv
        self.lkb_reparam.requires_grad_(origin.weight.requires_grad)
        del self.lkb_origin
        if hasattr(self, "small_conv"):
            del self.small_conv


class RepLKBlock(nn.Module):
    """x + DropPath(pw2(ReLU(large_kernel(pw1(prelkb_bn(x)))))): the paper's large-kernel block (1×1 expand to the
    depthwise width, K×K depthwise, 1×1 back), pre-normed by its own BN."""

    def __init__(
            self,
            in_chs: int,
            dw_chs: int,
            kernel_size: int,
            small_kernel: int | None,
            drop_path: float = 0.0,
            small_kernel_merged: bool = False,
            fft: FftMode = False,
    ) -> None:
        super().__init__()
        self.pw1 = ConvBN(in_chs, dw_chs, 1, act=True)
        self.pw2 = ConvBN(dw_chs, in_chs, 1)
        self.large_kernel = ReparamLargeKernelConv(dw_chs, kernel_size, small_kernel, small_kernel_merged, fft)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """x + DropPath(pw2(GELU(pw1(preffn_bn(x))))): the 1×1-conv feed-forward block that follows every RepLKBlock."""

    def __init__(self, in_chs: int, hidden_chs: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.preffn_bn = nn.BatchNorm2d(in_chs)
        self.pw1 = ConvBN(in_chs, hidden_chs, 1)
        self.pw2 = ConvBN(hidden_chs, in_chs, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(nn.Module):
    """``depth`` (RepLKBlock, ConvFFN) pairs as ``blocks.0 .. blocks.{2·depth−1}``; ``norm`` (BN or Identity) is only
    applied to intermediate outputs (``forward_intermediates(norm=True)``), never inside the stage."""

    def __init__(
            self,
            channels: int,
            depth: int,
            kernel_size: int,
            drop_path_rates: Sequence[float],
            small_kernel: int | None,
            dw_ratio: float = 1.0,
            ffn_ratio: float = 4.0,
            small_kernel_merged: bool = False,
            norm_intermediate_features: bool = False,
            fft: FftMode = False,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        blocks = []
        for i in range(depth):
            blocks.append(RepLKBlock(
                channels, int(channels * dw_ratio), kernel_size, small_kernel, drop_path_rates[i],
                small_kernel_merged, fft))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path_rates[i]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.BatchNorm2d(channels) if norm_intermediate_features else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
        return x


class RepLKNet(nn.Module):
    """RepLKNet (stem → 4 stages of RepLK/ConvFFN pairs with 1×1 + depthwise-3×3/2 transitions → BN, pool, linear).

    Constructor arguments keep the official names (``large_kernel_sizes``, ``layers``, ``channels``,
    ``small_kernel``, ``dw_ratio``, ``ffn_ratio``, ...), so the official constructor kwargs build the same model.
    ``in_chans`` is timm's name for ``in_channels``.
    """

    #: Module whose output is the paper's ERF quantity: the stage-4 output before the final BN.
    erf_target = "stages.3"

    def __init__(
            self,
            large_kernel_sizes: Sequence[int] = (31, 29, 27, 13),
            layers: Sequence[int] = (2, 2, 18, 2),
            channels: Sequence[int] = (128, 256, 512, 1024),
            drop_path_rate: float = 0.0,
            small_kernel: int | None = 5,
            dw_ratio: float = 1.0,
            ffn_ratio: float = 4.0,
            in_channels: int | None = None,
            num_classes: int = 1000,
            out_indices: Sequence[int] | None = None,
            use_checkpoint: bool = False,
            small_kernel_merged: bool = False,
            use_sync_bn: bool = False,
            norm_intermediate_features: bool = False,
            fft_large_kernel: FftMode = False,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            in_chans: int = 3,
    ) -> None:
        """
        Args:
            large_kernel_sizes: K per stage (31B: 31, 29, 27, 13).
            layers: (RepLKBlock, ConvFFN) pairs per stage.
            channels: widths per stage.
            drop_path_rate: stochastic depth, linearly increasing over the pairs (shared within a pair).
            small_kernel: parallel re-parameterisation kernel (5), or None (XL).
            dw_ratio: depthwise width / stage width inside a RepLKBlock (XL: 1.5).
            ffn_ratio: ConvFFN hidden width / stage width.
            in_channels: input channels (official name; takes precedence over timm's ``in_chans``).
            num_classes: classes of the linear head; 0 keeps norm and pooling without a linear layer.
            out_indices: only None. The official headless backbone mode is served by timm's
                ``features_only=True`` or :meth:`forward_intermediates` with ``norm=True``.
            use_checkpoint: gradient checkpointing per block (saves memory, costs a second forward).
            small_kernel_merged: build the re-parameterised layout (``lkb_reparam``) directly.
            use_sync_bn: accepted for the official signature and ignored (see the module docstring).
            norm_intermediate_features: a BN per stage for intermediate outputs (official detection/segmentation).
            fft_large_kernel: compute the large depthwise convolutions with FFTs (:func:`fft_depthwise_conv2d`):
                True for all, "auto" where it is faster (CPU, kernels >= ``FFT_DEPTHWISE_MIN_KERNEL``), False (default)
                for PyTorch's direct convolution, the same arithmetic as the official code.
            global_pool: timm pooling type of the head.
            drop_rate: dropout before the linear head (not in the official model; 0 keeps it out).
        """
        super().__init__()
        in_chans = in_channels if in_channels is not None else in_chans
        if not len(large_kernel_sizes) == len(layers) == len(channels):
            raise ValueError("large_kernel_sizes, layers and channels need one entry per stage")
        if out_indices is not None:
            raise ValueError(
                "out_indices (the official headless backbone mode) is not supported: use "
                "timm.create_model(..., features_only=True, out_indices=...) or forward_intermediates(norm=True)")
        del use_sync_bn  # plain BatchNorm2d everywhere; see the module docstring
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = channels[-1]

        c0 = channels[0]
        self.stem = nn.Sequential(
            ConvBN(in_chans, c0, 3, stride=2, act=True),
            ConvBN(c0, c0, 3, groups=c0, act=True),
            ConvBN(c0, c0, 1, act=True),
            ConvBN(c0, c0, 3, stride=2, groups=c0, act=True),
        )
        rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()  # also under meta
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.feature_info = []
        reduction = 4
        for i, (kernel, depth, chs) in enumerate(zip(large_kernel_sizes, layers, channels)):
            # stages and transitions are created interleaved, in the official order
            self.stages.append(RepLKNetStage(
                chs, depth, kernel, rates[sum(layers[:i]):sum(layers[:i + 1])], small_kernel, dw_ratio, ffn_ratio,
                small_kernel_merged, norm_intermediate_features, fft_large_kernel))
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"stages.{i}"))
            if i < len(channels) - 1:
                self.transitions.append(nn.Sequential(
                    ConvBN(chs, channels[i + 1], 1, act=True),
                    ConvBN(channels[i + 1], channels[i + 1], 3, stride=2, groups=channels[i + 1], act=True),
                ))
                reduction *= 2

        self.norm = nn.BatchNorm2d(self.num_features)
        self.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.set_grad_checkpointing(use_checkpoint)

    def init_weights(self) -> None:
        """Re-draw every parameter with the official init (PyTorch defaults); see :func:`_init_weights`."""
        self.apply(_init_weights)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the linear head (e.g. 21841-class ImageNet-22k checkpoints); 0 removes it."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        device = self.stem[0].conv.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def structural_reparam(self) -> RepLKNet:
        """Merge every large/small kernel pair into one BN-folded K×K conv (the deploy layout), in place.

        Eval-mode outputs are unchanged up to float rounding; the ERF is the same. Irreversible: the training-time
        branches are gone afterwards. Returns the model for chaining.
        """
        for module in self.modules():
            if isinstance(module, ReparamLargeKernelConv):
                module.merge_kernel()
        return self

    @property
    def is_merged(self) -> bool:
        """Whether the large kernels are in the re-parameterised (``lkb_reparam``) layout."""
        return all(m.merged for m in self.modules() if isinstance(m, ReparamLargeKernelConv))

    def set_fft_large_kernel(self, enable: FftMode = True) -> None:
        """Switch the FFT path of the large depthwise convolutions (True, "auto" or False; same weights, same
        outputs to float rounding)."""
        check_fft_mode(enable)
        for module in self.modules():
            if isinstance(module, ReparamLargeKernelConv):
                module.fft = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (before the transitions) as a list, optionally with the final features.

        Args:
            x: input images.
            indices: last n stages if int, all if None, else the listed stage indices.
            norm: pass each intermediate through its stage's ``norm`` (a BN only with
                ``norm_intermediate_features``, as in the official backbone mode; Identity otherwise).
            stop_early: stop after the last requested stage.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the list.
        """
        if output_fmt != "NCHW":
            raise ValueError("RepLKNet outputs are NCHW")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last = max_index if stop_early else len(self.stages) - 1
        x = self.stem(x)
        for i in range(last + 1):
            x = self.stages[i](x)
            if i in take_indices:
                intermediates.append(self.stages[i].norm(x) if norm else x)
            if i < last:
                x = self.transitions[i](x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        cut = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        self.transitions = self.transitions[:max_index]
        if prune_norm or cut:  # the final BN is sized for the last stage
            self.norm = nn.Identity()
        if cut:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-4 output before the final BN: the official ``forward_features`` and the paper's ERF quantity."""
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final BN → global pool → (dropout) → linear, as the official ``forward`` does after the features."""
        x = self.head_drop(self.avgpool(self.norm(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """The official init is PyTorch's default (convs/linears kaiming-uniform a=√5, BN γ=1, β=0, fresh running
    statistics): nothing is zero-initialised, so every residual branch is live at random init and
    ``erf_tools.weights.find_silenced_branches`` reports none. The constructor therefore applies no init of its own;
    this restores the defaults, e.g. after ``activate_branches``."""
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        module.reset_parameters()


def merge_state_dict(state_dict: Mapping[str, torch.Tensor], eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """Convert a training-layout state dict into the re-parameterised layout (``lkb_reparam``), key order kept.

    The tensor-level twin of :meth:`RepLKNet.structural_reparam`, for loading an unmerged checkpoint into a merged
    model without building an unmerged one first.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lkb_origin." not in key and ".small_conv." not in key:
            out[key] = value
        elif key.endswith(".lkb_origin.conv.weight"):
            prefix = key[: -len("lkb_origin.conv.weight")]

            def branch(name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
                if f"{prefix}{name}.conv.weight" not in state_dict:
                    return None
                bn = {p: state_dict[f"{prefix}{name}.bn.{p}"]
                      for p in ("weight", "bias", "running_mean", "running_var")}
                return fuse_bn(state_dict[f"{prefix}{name}.conv.weight"], bn, eps)

            out[f"{prefix}lkb_reparam.weight"], out[f"{prefix}lkb_reparam.bias"] = _merge_branches(
                branch("lkb_origin"), branch("small_conv"))
    return out


def checkpoint_filter_fn(state_dict: Mapping, model: RepLKNet) -> dict[str, torch.Tensor]:
    """Prepare an official RepLKNet checkpoint for a strict load into ``model``, whatever the two layouts are.

    Unwraps ``{'model': ...}`` / ``{'state_dict': ...}`` training checkpoints. Official releases may be in either
    layout, so the layouts are reconciled rather than refused:

    * merged checkpoint (``lkb_reparam`` keys), unmerged model: the **model is merged in place first**
      (``model.structural_reparam()``). The branch weights cannot be recovered from their sum, and the merged model
      computes the same eval-mode function, so the ERF is unaffected; only training with separate branches is lost.
    * unmerged checkpoint, merged model: the checkpoint's branches are folded (:func:`merge_state_dict`).
    """
    state = unwrap_checkpoint(state_dict)
    if any(k.startswith("backbone.") for k in state):  # mmpretrain's layout (timm.create_model(pretrained=True))
        from erf_tools.converters import convert_state_dict

        state, _ = convert_state_dict(state, model)
    if any(".dw.dw_large." in k or k.startswith("blocks.") for k in state):
        raise ValueError(
            "this looks like a MegEngine RepLKNet checkpoint (dw.dw_large / flat blocks.N keys); only the official "
            "PyTorch layout of DingXiaoH/RepLKNet-pytorch is supported")
    checkpoint_merged = any(".lkb_reparam." in k for k in state)
    checkpoint_unmerged = any(".lkb_origin." in k for k in state)
    if checkpoint_merged and not model.is_merged:
        model.structural_reparam()
    elif checkpoint_unmerged and model.is_merged:
        state = merge_state_dict(state)
    return state


def _create_replknet(variant: str, pretrained: bool = False, **kwargs) -> RepLKNet:
    return build_model_with_cfg(
        RepLKNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # stages and transitions are separate lists, so features come from forward_intermediates
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(file: str | None = None, **kwargs) -> dict:
    # Official eval transform (datasets.py, from ConvNeXt): below 384 resize to input/0.875 then centre-crop,
    # bicubic; at 384 and above warp-resize to the input size without cropping ("squash").
    return {
        "file": file, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv", "classifier": "head",
        "license": "mit", "paper_ids": "arXiv:2203.06717",
        "paper_name": "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs",
        "origin_url": "https://github.com/DingXiaoH/RepLKNet-pytorch", **kwargs,
    }


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash")
_IN22K = dict(num_classes=21841)
_MMPRETRAIN = "https://download.openmmlab.com/mmclassification/v0/replknet/"
_MM_NOTE = ("OpenMMLab mmpretrain conversion of the official release",)
_UNNAMED = ("the README links this checkpoint on Google Drive / Baidu without a file name; "
            "load it with erf_tools.weights.load_checkpoint",)

# Weights are Google-Drive / Baidu downloads: `file` is the official file name, so
# timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path)) or load_checkpoint() loads them.
default_cfgs = generate_default_cfgs({
    "replknet_31b.in1k": _cfg(file="RepLKNet-31B_ImageNet-1K_224.pth",
                              notes=("Google Drive id 1azQUiCxK9feYVkkrPqwVPBtNsTzDrX7S (README)",)),
    "replknet_31b.in1k_384": _cfg(**_384, notes=_UNNAMED + ("Google Drive id 1vo-P3XB6mRLUeDzmgv90dOu73uCeLfZN",)),
    "replknet_31b.in22k": _cfg(file="RepLKNet-31B_ImageNet-22K.pth", **_IN22K),
    "replknet_31b.in22k_ft_in1k": _cfg(notes=_UNNAMED + ("Google Drive id 1DslZ2voXZQR1QoFY9KnbsHAeF84hzS0s",)),
    "replknet_31b.in22k_ft_in1k_384": _cfg(**_384, notes=_UNNAMED + (
        "Google Drive id 1Sc46BWdXXm2fVP-K_hKKU_W8vAB-0duX",)),
    "replknet_31b.erf_in1k": _cfg(notes=(
        "RepLKNet-31 of the paper's ERF study (120 epochs), Google Drive id 1aQQiGfCoiBYSw2Ms506-ZFpnC9V6891s",)),
    "replknet_31l.in22k_ft_in1k_384": _cfg(file="RepLKNet-31L_ImageNet-22K-to-1K_384.pth", **_384),
    # the README lists the 31L 22K checkpoint in its 384 row; its pre-training resolution is not stated
    "replknet_31l.in22k": _cfg(file="RepLKNet-31L_ImageNet-22K.pth", **_IN22K),
    # XL: mean = std = 0.5 for MegData73M pre-training and ImageNet-1K fine-tuning; 320 < 384, so crop 0.875
    "replknet_xl.megdata73m_ft_in1k_320": _cfg(
        file="RepLKNet-XL_MegData73M_ImageNet1K.pth", input_size=(3, 320, 320), pool_size=(10, 10),
        mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
    "replknet_13.erf_in1k": _cfg(notes=(
        "RepLKNet-13 of the paper's ERF study (120 epochs), Google Drive id 15gohkZof_Qi4__jluUXacB_0Gvbuf5GI",)),
    # OpenMMLab's conversions of the official files (mmpretrain configs/replknet/metafile.yml): downloadable, in
    # mmpretrain's layout (backbone. prefix, head.fc), converted on load by erf_tools.converters (mmpretrain-replknet)
    "replknet_31b.mmpretrain_in1k": _cfg(url=_MMPRETRAIN + "replknet-31B_3rdparty_in1k_20221118-fd08e268.pth",
                                         license="apache-2.0", notes=_MM_NOTE),
    "replknet_31b.mmpretrain_in1k_384": _cfg(
        url=_MMPRETRAIN + "replknet-31B_3rdparty_in1k-384px_20221118-03a170ce.pth", **_384, license="apache-2.0",
        notes=_MM_NOTE),
    "replknet_31b.mmpretrain_in22k_ft_in1k": _cfg(
        url=_MMPRETRAIN + "replknet-31B_in21k-pre_3rdparty_in1k_20221118-54ed5c46.pth", license="apache-2.0",
        notes=_MM_NOTE),
    "replknet_31b.mmpretrain_in22k_ft_in1k_384": _cfg(
        url=_MMPRETRAIN + "replknet-31B_in21k-pre_3rdparty_in1k-384px_20221118-76c92b24.pth", **_384,
        license="apache-2.0", notes=_MM_NOTE),
    "replknet_31l.mmpretrain_in22k_ft_in1k_384": _cfg(
        url=_MMPRETRAIN + "replknet-31L_in21k-pre_3rdparty_in1k-384px_20221118-dc3fc07c.pth", **_384,
        license="apache-2.0", notes=_MM_NOTE),
    "replknet_xl.mmpretrain_megdata73m_ft_in1k_320": _cfg(
        url=_MMPRETRAIN + "replknet-XL_meg73m-pre_3rdparty_in1k-320px_20221118-88259b1d.pth",
        input_size=(3, 320, 320), pool_size=(10, 10), mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD,
        license="apache-2.0", notes=_MM_NOTE),
})


@register_model
def replknet_31b(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31B (79.9M parameters)."""
    model_args = dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024))
    return _create_replknet("replknet_31b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def replknet_31l(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31L (172.7M parameters)."""
    model_args = dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(192, 384, 768, 1536))
    return _create_replknet("replknet_31l", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def replknet_xl(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-XL (335.4M parameters): no small kernel, depthwise width 1.5x."""
    model_args = dict(
        large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2), channels=(256, 512, 1024, 2048),
        small_kernel=None, dw_ratio=1.5)
    return _create_replknet("replknet_xl", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def replknet_13(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-13: the 31B network with every large kernel 13, the paper's ERF comparison model."""
    model_args = dict(large_kernel_sizes=(13, 13, 13, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024))
    return _create_replknet("replknet_13", pretrained=pretrained, **dict(model_args, **kwargs))
