"""UniRepLKNet: large kernels with dilated re-parameterisation, SE and GRN.

Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, Time-Series and
Image Recognition", CVPR 2024 (arXiv 2311.15599). Parameter names follow the official code
(``AILab-CVC/UniRepLKNet`` ``unireplknet.py``) so its checkpoints load with ``strict=True``, in the training layout
(``deploy=False``, the released ImageNet files) and in the deploy layout (``deploy=True``, what the official
``reparameterize_unireplknet()`` produces).

A block is ``x + gamma * BN(Linear(GRN(GELU(Linear(SE(BN(dwconv(x))))))))`` with the Linears channels-last. In
13x13 blocks ``dwconv`` is the Dilated Reparam Block: a 13x13 depthwise conv plus parallel dilated small kernels
(5x5 r1, 7x7 r2, 3x3 r3, r4, r5), each with its BN; 3x3 blocks have a plain depthwise conv. The deploy conversion
(:meth:`UniRepLKNet.structural_reparam`) folds, per block and exactly in eval mode (Sec. 3.2 and the official
``reparameterize``):

1. every branch BN into its conv, each dilated kernel into its dense equivalent, all into one 13x13 conv with bias;
2. the block BN into that conv;
3. the GRN bias, the BN after the second Linear and the layer scale ``gamma`` into the second Linear.

Differences from the official code, none of which changes state-dict keys or eval outputs:

* Every BN is ``nn.BatchNorm2d``; ``use_sync_bn`` is accepted and ignored (SyncBatchNorm has the same keys and, in
  eval mode, the same outputs; use ``nn.SyncBatchNorm.convert_sync_batchnorm`` to train on several GPUs).
  ``attempt_use_lk_impl`` (an optional CUDA conv) is accepted and ignored.
* Unknown keyword arguments raise ``TypeError``; the official constructor swallows them silently.
* The headless OpenMMLab mode (``init_cfg``, per-stage LayerNorms ``norm0..norm3``) is not built; use
  ``forward_intermediates`` / ``features_only=True`` for stage outputs.
* ``forward_features`` (absent in the official class) returns the spatial ``stages[3]`` output, the ERF layer
  (``erf_target = "stages.3"``, before the mean, the final LayerNorm and the head); ``forward_head`` does the rest.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint
from torch import nn

from erf_tools.models.common import unwrap_checkpoint
from erf_tools.layers.staged import MeanNormHeadBackbone
from erf_tools.layers.reparam import bn_from_state_dict, dilated_to_dense, fold_bn, merge_kernels

__all__ = [
    "DILATED_BRANCHES", "DilatedReparamBlock", "GRN", "UniRepLKNet", "UniRepLKNetBlock", "checkpoint_filter_fn",
    "default_kernel_sizes", "reparameterize_state_dict",
]

NORM_EPS = 1e-6
BN_EPS = 1e-5

#: Dilated Reparam Block branches per large kernel K: (small kernels k, dilation rates r) (official defaults).
DILATED_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}

#: Per-block kernel sizes of the released depth settings (official ``default_depths_to_kernel_sizes``).
_KERNEL_TABLES: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {
    (2, 2, 6, 2): ((3,) * 2, (13,) * 2, (13,) * 6, (13,) * 2),  # A, F, P
    (2, 2, 8, 2): ((3,) * 2, (13,) * 2, (13,) * 8, (13,) * 2),  # N
    (3, 3, 18, 3): ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3),  # T
    (3, 3, 27, 3): ((3,) * 3, (13,) * 3, (13, 3, 3) * 9, (13,) * 3),  # S, B, L, XL
}


def default_kernel_sizes(depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The official per-block kernel table for ``depths``; other depths need explicit ``kernel_sizes``."""
    try:
        return _KERNEL_TABLES[tuple(depths)]
    except KeyError:
        raise ValueError(f"no default kernel sizes for depths {tuple(depths)}: pass kernel_sizes, one tuple per stage "
                         f"(defaults exist for {sorted(_KERNEL_TABLES)})") from None


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2) on NHWC input: ``(γ·N(x) + 1)·x + β``, with
    ``N(x)_c = ‖x_c‖₂ / (mean_c ‖x_c‖₂ + 1e-6)`` over H, W (official ``GRNwithNHWC``)."""

    def __init__(self, dim: int, use_bias: bool = True) -> None:
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        out = (self.gamma * (norms / (norms.mean(dim=-1, keepdim=True) + 1e-6)) + 1) * x
        return out + self.beta if self.use_bias else out

    @torch.no_grad()
    def active_init_(self, generator: torch.Generator) -> None:
        """γ ~ N(0, 0.5²) (the GRN term about half the size of x), β ~ N(0, 0.1²): the conformance randomisation."""
        self.gamma.copy_(torch.randn(self.gamma.shape, generator=generator) * 0.5)
        if self.use_bias:
            self.beta.copy_(torch.randn(self.beta.shape, generator=generator) * 0.1)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: ``x · sigmoid(up(ReLU(down(mean_HW(x)))))`` with 1x1 convs, reduction 4."""

    def __init__(self, channels: int, internal: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1)
        self.up = nn.Conv2d(internal, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def _depthwise(channels: int, kernel: int, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, padding=(dilation * (kernel - 1) + 1) // 2, dilation=dilation,
                     groups=channels, bias=bias)


def _branch_name(kernel: int, rate: int) -> str:
    return f"k{kernel}_{rate}"


class DilatedReparamBlock(nn.Module):
    """``origin_bn(lk_origin(x)) + Σ dil_bn_k{k}_{r}(dil_conv_k{k}_{r}(x))``: a K x K depthwise conv and parallel
    dilated small depthwise convs, each with its BN; after :meth:`merge_dilated_branches` one K x K conv with bias."""

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"the Dilated Reparam Block has no branch table for kernel {kernel_size} "
                             f"(known: {sorted(DILATED_BRANCHES)})")
        self.kernel_size = kernel_size
        self.kernel_sizes, self.dilates = DILATED_BRANCHES[kernel_size]
        self.lk_origin = _depthwise(channels, kernel_size, bias=deploy)
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                self.add_module(f"dil_conv_{_branch_name(k, r)}", _depthwise(channels, k, dilation=r))
                self.add_module(f"dil_bn_{_branch_name(k, r)}", nn.BatchNorm2d(channels))

    @property
    def merged(self) -> bool:
        return not hasattr(self, "origin_bn")

    def _branches(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, int]]:
        return [(getattr(self, f"dil_conv_{_branch_name(k, r)}"), getattr(self, f"dil_bn_{_branch_name(k, r)}"), r)
                for k, r in zip(self.kernel_sizes, self.dilates)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for conv, bn, _ in self._branches():
            out = out + bn(conv(x))
        return out

    @torch.no_grad()
    def merge_dilated_branches(self) -> None:
        """Fold every branch into ``lk_origin`` (now with a bias) and delete the branches; no-op when merged."""
        if self.merged:
            return
        origin = self.lk_origin
        kernel, bias = merge_dilated(
            fold_bn(origin.weight, self.origin_bn),
            [(*fold_bn(conv.weight, bn), r) for conv, bn, r in self._branches()], self.kernel_size)
        merged = _depthwise(origin.in_channels, self.kernel_size, bias=True).to(kernel.device, kernel.dtype)
        merged.weight.data, merged.bias.data = kernel, bias
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_{_branch_name(k, r)}")
            delattr(self, f"dil_bn_{_branch_name(k, r)}")
        self.lk_origin = merged


def merge_dilated(
    large: tuple[torch.Tensor, torch.Tensor], dilated: Sequence[tuple[torch.Tensor, torch.Tensor, int]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One size x size kernel and bias from the BN-folded large branch and the BN-folded dilated (kernel, bias, rate)
    branches."""
    return merge_kernels([large] + [(dilated_to_dense(k, r), b) for k, b, r in dilated], size)


def fold_output_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grn_beta: torch.Tensor | None,
    bn: nn.BatchNorm2d | Mapping[str, torch.Tensor] | None,
    scale: torch.Tensor | None,
    eps: float = BN_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second Linear with the GRN bias before it and the BN and layer scale after it folded in.

    ``gamma·BN(W(z + β) + b) = W'z + b'`` with ``W' = W·(γ_bn/σ·gamma)[:, None]`` and
    ``b' = (β_bn + (Wβ + b − μ)·γ_bn/σ)·gamma`` (each term dropped when absent).
    """
    shifted = bias if bias is not None else weight.new_zeros(weight.shape[0])
    if grn_beta is not None:
        shifted = shifted + weight @ grn_beta.reshape(-1)
    weight, bias = fold_bn(weight[:, :, None, None], bn, shifted, eps)
    weight = weight[:, :, 0, 0]
    if scale is not None:
        weight, bias = weight * scale[:, None], bias * scale
    return weight, bias


class UniRepLKNetBlock(nn.Module):
    """``x + DropPath(gamma · pwconv2(act(pwconv1(se(norm(dwconv(x)))))))`` (official ``UniRepLKNetBlock``).

    ``kernel_size`` >= 7: Dilated Reparam Block; 3 or 5: plain depthwise conv; 0: no token mixer (and no norm).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        deploy: bool = False,
        with_cp: bool = False,
        ffn_factor: int = 4,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        if kernel_size == 0:
            self.dwconv = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy)
        elif kernel_size in (3, 5):
            self.dwconv = _depthwise(dim, kernel_size, bias=deploy)
        else:
            raise ValueError(
                f"UniRepLKNet block kernels are 0, 3, 5 or >= 7 (Dilated Reparam Block), got {kernel_size}")
        self.norm = nn.Identity() if deploy or kernel_size == 0 else nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(ToChannelsLast(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn_dim, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), ToChannelsFirst())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), ToChannelsFirst(), nn.BatchNorm2d(dim))
        use_scale = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if use_scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def merged(self) -> bool:
        """Whether the block is in the deploy layout (no BN after the second Linear)."""
        return len(self.pwconv2) == 2

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.se(self.norm(self.dwconv(x))))))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return self.drop_path(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad and not torch.jit.is_scripting():
            return x + checkpoint(self._residual, x)
        return x + self._residual(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """The official deploy conversion of this block, in place (eval-mode equivalent; no-op when merged)."""
        frozen = not any(p.requires_grad for p in self.parameters())
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.merge_dilated_branches()
        if isinstance(self.norm, nn.BatchNorm2d):
            conv = self.dwconv.lk_origin if isinstance(self.dwconv, DilatedReparamBlock) else self.dwconv
            kernel, bias = fold_bn(conv.weight, self.norm, conv.bias)
            if conv.bias is None:  # the plain 3x3 / 5x5 conv gains a bias
                fused = _depthwise(conv.in_channels, conv.kernel_size[0], bias=True).to(kernel.device, kernel.dtype)
                self.dwconv = conv = fused
            conv.weight.data, conv.bias.data = kernel, bias
            self.norm = nn.Identity()
        if not self.merged:
            grn, linear = self.act[1], self.pwconv2[0]
            weight, bias = fold_output_linear(
                linear.weight, linear.bias, grn.beta if grn.use_bias else None, self.pwconv2[2],
                self.gamma)
            fused = nn.Linear(linear.in_features, linear.out_features, device=weight.device, dtype=weight.dtype)
            fused.weight.data, fused.bias.data = weight, bias
            self.pwconv2 = nn.Sequential(fused, ToChannelsFirst())
            if grn.use_bias:
                del grn.beta
                grn.use_bias = False
            self.gamma = None
        if frozen:
            self.requires_grad_(False)


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """Two 3x3/s2 convs (C0/2 then C0), each followed by a channels-first LayerNorm, GELU in between: stride 4."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), LayerNorm2d(dim // 2, eps=NORM_EPS), nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), LayerNorm2d(dim, eps=NORM_EPS))


class UniRepLKNet(MeanNormHeadBackbone):
    """UniRepLKNet: a stride-4 stem, 3x3/s2 conv + LN downsamplers and four stages of :class:`UniRepLKNetBlock`.

    Args (official names):
        in_chans: input channels.
        num_classes: classifier outputs (0: none).
        depths: blocks per stage.
        dims: channels per stage.
        drop_path_rate: stochastic depth, linear over all blocks.
        layer_scale_init_value: initial layer scale ``gamma`` (1e-6 silences every branch at init; None/<= 0: none).
        head_init_scale: factor on the classifier weight and bias after init.
        kernel_sizes: one tuple of block kernels per stage; None: the official table for ``depths``.
        deploy: build the re-parameterised (deploy) layout.
        with_cp: gradient checkpointing per block.
        init_cfg: only None (see the module docstring).
        attempt_use_lk_impl, use_sync_bn: accepted and ignored (see the module docstring).
        global_pool: ``"avg"`` or ``""``.
        drop_rate: dropout before the classifier (not in the official model).
    """

    erf_target = "stages.3"
    nchw_error = "UniRepLKNet intermediates are NCHW only"
    final_norm_name = "norm"  # LayerNorm on the pooled vector

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        deploy: bool = False,
        with_cp: bool = False,
        init_cfg: Any = None,
        attempt_use_lk_impl: bool = True,
        use_sync_bn: bool = False,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        del attempt_use_lk_impl, use_sync_bn  # see the module docstring
        if init_cfg is not None:
            raise ValueError("init_cfg (the OpenMMLab backbone mode) is not supported: use forward_intermediates or "
                             "timm.create_model(..., features_only=True) for stage outputs")
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError("UniRepLKNet has four stages: depths and dims need four entries each")
        kernel_sizes = default_kernel_sizes(depths) if kernel_sizes is None else kernel_sizes
        if len(kernel_sizes) != 4 or any(len(k) != d for k, d in zip(kernel_sizes, depths)):
            raise ValueError(
                f"kernel_sizes {kernel_sizes} does not give one kernel per block of depths {tuple(depths)}")
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]

        self.downsample_layers = nn.ModuleList([_stem(in_chans, dims[0])])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm2d(dims[i + 1], eps=NORM_EPS)))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: also under meta
        self.stages = nn.ModuleList()
        self.feature_info = []
        first = 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(dim, kernel_sizes[i][j], rates[first + j], layer_scale_init_value, deploy, with_cp)
                for j in range(depth)]))
            first += depth
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.init_head(dims[-1], num_classes, drop_rate, head_init_scale, NORM_EPS)

    def _blocks(self) -> list[UniRepLKNetBlock]:
        return [m for m in self.modules() if isinstance(m, UniRepLKNetBlock)]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for block in self._blocks():
            block.with_cp = enable

    def structural_reparam(self) -> UniRepLKNet:
        """The official deploy conversion (``reparameterize_unireplknet``), in place; returns the model.

        Eval-mode outputs are unchanged up to float rounding (so is the ERF); irreversible. The result has exactly
        the keys, shapes and order of ``deploy=True``.
        """
        for block in self._blocks():
            block.reparameterize()
        return self

    reparameterize_unireplknet = structural_reparam  # the official name

    @property
    def is_merged(self) -> bool:
        """Whether every block is in the deploy layout."""
        return all(block.merged for block in self._blocks())


_BLOCK_KEY = re.compile(r"^(stages\.\d+\.\d+)\.(.+)$")
_DILATED_KEY = re.compile(r"^dwconv\.dil_conv_k(\d+)_(\d+)\.weight$")


def _deploy_block(local: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """One block's training-layout tensors (keys relative to the block) in the deploy layout, in deploy order."""
    if "pwconv2.2.weight" not in local:  # already deploy
        return dict(local)

    def bn(prefix: str) -> dict[str, torch.Tensor] | None:
        return bn_from_state_dict(local, prefix)

    used = {k for k in local if k in ("gamma", "act.1.beta") or k.startswith(("dwconv.", "norm.", "pwconv2."))}
    out: dict[str, torch.Tensor] = {}
    conv = "dwconv.lk_origin" if "dwconv.lk_origin.weight" in local else "dwconv" if "dwconv.weight" in local else None
    if conv is not None:
        kernel, bias = local[f"{conv}.weight"], local.get(f"{conv}.bias")
        if "dwconv.origin_bn.weight" in local:  # Dilated Reparam Block branches, in state-dict order
            dilated = [(*fold_bn(local[key], bn(f"dwconv.dil_bn_k{m[1]}_{m[2]}"), eps=eps), int(m[2]))
                       for key in local if (m := _DILATED_KEY.match(key))]
            origin = fold_bn(kernel, bn("dwconv.origin_bn"), eps=eps)
            kernel, bias = merge_dilated(origin, dilated, kernel.shape[-1])
        if "norm.weight" in local:
            kernel, bias = fold_bn(kernel, bn("norm"), bias, eps)
        out[f"{conv}.weight"], out[f"{conv}.bias"] = kernel, bias
    out.update({k: v for k, v in local.items() if k not in used})
    out["pwconv2.0.weight"], out["pwconv2.0.bias"] = fold_output_linear(
        local["pwconv2.0.weight"], local.get("pwconv2.0.bias"), local.get("act.1.beta"), bn("pwconv2.2"),
        local.get("gamma"), eps)
    return out


def reparameterize_state_dict(state_dict: Mapping[str, torch.Tensor], eps: float = BN_EPS) -> dict[str, torch.Tensor]:
    """A training-layout state dict in the deploy layout (keys and order of ``deploy=True``).

    The tensor-level twin of :meth:`UniRepLKNet.structural_reparam`, to load a training checkpoint (the released
    ImageNet files) into a deploy model without building a training model first.
    """
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        if match[1] not in blocks:
            blocks[match[1]] = {}
            out[match[1]] = None  # placeholder keeps the block's position
        blocks[match[1]][match[2]] = value
    result: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        if key in blocks:
            result.update({f"{key}.{k}": v for k, v in _deploy_block(blocks[key], eps).items()})
        else:
            result[key] = value
    return result


def _is_training_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(".pwconv2.2." in k or ".dwconv.origin_bn." in k for k in state)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """Prepare an official UniRepLKNet checkpoint (either layout) for a strict load into ``model`` (either layout).

    Unwraps ``{'model': ...}``; drops the classifier for a headless model. A deploy checkpoint re-parameterises a
    training model in place first (the branches cannot be recovered from their sum; eval outputs are the same); a
    training checkpoint is converted for a deploy model (:func:`reparameterize_state_dict`).
    """
    state = unwrap_checkpoint(state_dict)
    if not isinstance(getattr(model, "head", None), nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    blocks = [k for k in state if _BLOCK_KEY.match(k)]
    if not blocks:
        return state
    if _is_training_layout(state):
        if model.is_merged:
            state = reparameterize_state_dict(state)
    elif not model.is_merged:
        model.structural_reparam()
    return state


def _create_unireplknet(variant: str, pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    return build_model_with_cfg(
        UniRepLKNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # downsample_layers and stages are separate ModuleLists, so features come from forward_intermediates
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_HF_HUB_ID = "DingXiaoH/UniRepLKNet"


def _cfg(filename: str, size: int = 224, **kwargs: Any) -> dict[str, Any]:
    # Eval transform (datasets.py): below 384 resize to size/0.875 and centre-crop, bicubic; at 384 warp ("squash").
    crop = dict(crop_pct=1.0, crop_mode="squash") if size >= 384 else dict(crop_pct=0.875)
    return {
        "hf_hub_id": _HF_HUB_ID, "hf_hub_filename": filename, "num_classes": 1000,
        "input_size": (3, size, size), "pool_size": (size // 32, size // 32), "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "downsample_layers.0.0",
        "classifier": "head", "license": "apache-2.0", "paper_ids": "arXiv:2311.15599",
        "paper_name": "UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, "
                      "Time-Series and Image Recognition",
        "origin_url": "https://github.com/AILab-CVC/UniRepLKNet", **crop, **kwargs,
    }


_IN22K = dict(num_classes=21841)
# File names of the official huggingface_file_names table; all training-layout state dicts (the official loader
# loads them strictly into deploy=False models). L and XL were pre-trained on ImageNet-22K at 192 px.
default_cfgs = generate_default_cfgs({
    "unireplknet_a.in1k": _cfg("unireplknet_a_in1k_224_acc77.03.pth"),
    "unireplknet_f.in1k": _cfg("unireplknet_f_in1k_224_acc78.58.pth"),
    "unireplknet_p.in1k": _cfg("unireplknet_p_in1k_224_acc80.23.pth"),
    "unireplknet_n.in1k": _cfg("unireplknet_n_in1k_224_acc81.64.pth"),
    "unireplknet_t.in1k": _cfg("unireplknet_t_in1k_224_acc83.21.pth"),
    "unireplknet_s.in1k": _cfg("unireplknet_s_in1k_224_acc83.91.pth"),
    "unireplknet_s.in22k_ft_in1k_384": _cfg("unireplknet_s_in22k_to_in1k_384_acc86.44.pth", 384),
    "unireplknet_s.in22k": _cfg("unireplknet_s_in22k_pretrain.pth", **_IN22K),
    "unireplknet_b.in22k_ft_in1k_384": _cfg("unireplknet_b_in22k_to_in1k_384_acc87.40.pth", 384),
    "unireplknet_b.in22k": _cfg("unireplknet_b_in22k_pretrain.pth", **_IN22K),
    "unireplknet_l.in22k_ft_in1k_384": _cfg("unireplknet_l_in22k_to_in1k_384_acc87.88.pth", 384),
    "unireplknet_l.in22k": _cfg("unireplknet_l_in22k_pretrain.pth", 192, **_IN22K),
    "unireplknet_xl.in22k_ft_in1k_384": _cfg("unireplknet_xl_in22k_to_in1k_384_acc87.96.pth", 384),
    "unireplknet_xl.in22k": _cfg("unireplknet_xl_in22k_pretrain.pth", 192, **_IN22K),
})


def _variant(name: str, model_args: dict[str, Any], pretrained: bool, kwargs: dict[str, Any]) -> UniRepLKNet:
    return _create_unireplknet(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def unireplknet_a(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-A (4.6M training-time / 4.4M deploy parameters)."""
    return _variant("unireplknet_a", dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)), pretrained, kwargs)


@register_model
def unireplknet_f(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-F (6.5M / 6.2M)."""
    return _variant("unireplknet_f", dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)), pretrained, kwargs)


@register_model
def unireplknet_p(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-P (11.1M / 10.7M)."""
    return _variant("unireplknet_p", dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)), pretrained, kwargs)


@register_model
def unireplknet_n(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-N (18.8M / 18.3M)."""
    return _variant("unireplknet_n", dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)), pretrained, kwargs)


@register_model
def unireplknet_t(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-T (31.7M / 31.0M)."""
    return _variant("unireplknet_t", dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640)), pretrained, kwargs)


@register_model
def unireplknet_s(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-S (56.5M / 55.6M)."""
    return _variant("unireplknet_s", dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)), pretrained, kwargs)


@register_model
def unireplknet_b(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-B (99.1M / 98.0M)."""
    return _variant("unireplknet_b", dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), pretrained, kwargs)


@register_model
def unireplknet_l(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-L (220.1M / 218.5M)."""
    return _variant("unireplknet_l", dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)), pretrained, kwargs)


@register_model
def unireplknet_xl(pretrained: bool = False, **kwargs: Any) -> UniRepLKNet:
    """UniRepLKNet-XL (388.7M / 386.5M)."""
    return _variant("unireplknet_xl", dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)), pretrained, kwargs)
