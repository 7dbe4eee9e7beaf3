"""Conv2Former (Hou et al., "Conv2Former: A Simple Transformer-Style ConvNet for Visual Recognition", TPAMI 2024).

A transformer-shaped ConvNet whose token mixer, *convolutional modulation* (ConvMod), replaces self-attention by a
large-kernel depthwise conv: ``A = DW_kxk(GELU(Conv1x1(x)))``, ``out = Conv1x1(A ⊙ Conv1x1(x))``. For ERFs the
interesting facts are the k x k kernel (7 for Conv2Former-N at the reference commit, 11 for the others), the
Hadamard product (the ERF is not that of a linear large-kernel conv), and the layer scales hard-coded to 1e-6 in the
official code, which make a random-init ERF show only the stem/downsample chain (use trained weights or
``erf_tools.weights.activate_branches``).

Keys are the official ones (``downsample_layers``, ``stages.s.b.attn.att.{0,2}``, ``head``, ``pred``), so official
checkpoints load strictly. ``forward_features`` returns the ``stages[3]`` map (the ERF target, before the ``head``
conv); ``forward_head`` applies ``head`` (Conv1x1 → 1280, GELU, LN), the spatial mean and ``pred``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from erf_tools.models.common import unwrap_checkpoint
from erf_tools.layers.staged import PrunableStagedBackbone

__all__ = ["Conv2Former", "checkpoint_filter_fn", "infer_kernel_size"]

#: Width of the official head (Conv1x1 → 1280, GELU, LN) before the classifier ``pred``.
HEAD_DIM = 1280


class ConvMod(nn.Module):
    """Convolutional modulation (official ``SpatialAttention``): ``proj(DW_k(GELU(att0(x̂))) ⊙ v(x̂))``, x̂ = LN(x).

    No sigmoid or normalisation on the modulation weights A: the paper's ablation found plain Hadamard products best.
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.att = nn.Sequential(
            nn.Conv2d(dim, dim, 1),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
        )
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.proj(self.att(x) * self.v(x))


class Mlp(nn.Module):
    """Conv2Former MLP: LN → fc1 (C→rC) → GELU → h + GELU(DW3x3(h)) → fc2 (rC→C); one GELU module used twice."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.pos = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.norm(x)))
        x = x + self.act(self.pos(x))
        return self.fc2(x)


class Conv2FormerBlock(nn.Module):
    """``x + DropPath(ls1 · ConvMod(x))``, then ``x + DropPath(ls2 · Mlp(x))``; one DropPath for both, as officially."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.attn = ConvMod(dim, kernel_size)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(x))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(x))


class Conv2Former(PrunableStagedBackbone):
    """Conv2Former with the official stem (two 3x3 convs + 2x2 patchify), LN + 2x2 downsampling and 1280-wide head.

    Argument names follow the official constructor for the arguments it uses. The official code ignores its
    ``layer_scale_init_value`` and hard-codes 1e-6; here the argument is honoured and defaults to 1e-6, so the default
    is the official model. ``drop_rate`` (dropout before ``pred``) is a timm extension, 0 by default.
    """

    erf_target = "stages.3"
    classifier_name = "pred"
    nchw_error = "Conv2Former intermediates are NCHW only"
    head_modules = ("head",)  # the Conv1x1 → 1280 head block goes with the classifier when pruned

    def __init__(
        self,
        kernel_size: int = 11,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 12, 3),
        dims: Sequence[int] = (72, 144, 288, 576),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"Conv2Former pools by spatial mean ('avg') or not at all (''), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.kernel_size = kernel_size
        self.num_features = dims[-1]
        self.head_hidden_size = HEAD_DIM

        stem_dim = dims[0] // 2
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1, bias=False),
                nn.GELU(),
                nn.BatchNorm2d(stem_dim),
                nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False),
                nn.GELU(),
                nn.BatchNorm2d(stem_dim),
                nn.Conv2d(stem_dim, dims[0], 2, stride=2, bias=False),
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            )

        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        self.feature_info = []
        cursor = 0
        for i, depth in enumerate(depths):
            self.stages.append(
                nn.Sequential(
                    *[
                        Conv2FormerBlock(dims[i], kernel_size, mlp_ratios[i], rates[cursor + j], layer_scale_init_value)
                        for j in range(depth)
                    ]
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
            cursor += depth

        self.head = nn.Sequential(nn.Conv2d(dims[-1], HEAD_DIM, 1), nn.GELU(), LayerNorm2d(HEAD_DIM, eps=1e-6))
        self.head_drop = nn.Dropout(drop_rate)
        self.pred = nn.Linear(HEAD_DIM, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``stages[3]`` output, (N, C3, H/32, W/32), before ``head``: the ERF target map."""
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``head`` (Conv1x1 → 1280, GELU, LN) → spatial mean → ``pred``, as in the official code."""
        x = self.head(x)
        if self.global_pool == "avg":
            x = x.mean((-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.pred(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """Official init: trunc_normal(0.02) for Conv2d/Linear weights, zero biases; norms keep weight 1, bias 0."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.is_meta:  # meta: shapes only, no values
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def infer_kernel_size(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The ConvMod kernel a checkpoint was trained with, from ``stages.0.0.attn.att.2.weight`` (C, 1, k, k).

    Needed because Conv2Former-N changed from 11 to 7 in 2025 and the B-22k factory uses 7: a released checkpoint's
    kernel is not implied by its variant name.
    """
    state = unwrap_checkpoint(state_dict)
    return int(state["stages.0.0.attn.att.2.weight"].shape[-1])


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """Bare state dict for ``model`` from an official checkpoint; renames the 2022 preview's ``attn.a.{0,2}``.

    Raises a ``ValueError`` naming the right ``kernel_size`` when the checkpoint's ConvMod kernel differs from the
    model's, instead of a wall of shape mismatches.
    """
    state = {k.replace(".attn.a.", ".attn.att."): v for k, v in unwrap_checkpoint(state_dict).items()}
    expected = getattr(model, "kernel_size", None)
    if expected is not None and "stages.0.0.attn.att.2.weight" in state:
        found = infer_kernel_size(state)
        if found != expected:
            raise ValueError(
                f"the checkpoint's ConvMod kernel is {found}x{found} but the model was built with kernel_size="
                f"{expected}; build it with kernel_size={found} (e.g. timm.create_model(name, kernel_size={found}))"
            )
    return state


def _create_conv2former(variant: str, pretrained: bool = False, **kwargs) -> Conv2Former:
    return build_model_with_cfg(
        Conv2Former,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    """224, crop 0.9, bicubic, ImageNet mean/std (the README's values).

    The official factories attach timm's ViT default cfg (mean = std = 0.5), which contradicts the README used for
    training and evaluation; the README wins here. Checkpoints are distributed through Baidu pan only, without file
    names; load a local copy with ``pretrained=True, pretrained_cfg_overlay=dict(file=path)`` or
    ``erf_tools.weights.load_checkpoint``.
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0",
        "classifier": "pred",
        "license": "unknown",
        "paper_ids": "arXiv:2211.11943",
        "origin_url": "https://github.com/HVision-NKU/Conv2Former",
        **kwargs,
    }


def _cfg_384(**kwargs) -> dict:
    return _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "conv2former_n.in1k": _cfg(notes=("top-1 81.5 (README)", "N checkpoint may predate the 11 -> 7 kernel change")),
        "conv2former_t.in1k": _cfg(notes=("top-1 83.2 (README)",)),
        "conv2former_s.in1k": _cfg(notes=("top-1 84.1 (README)",)),
        "conv2former_s.in22k_ft_in1k": _cfg(notes=("top-1 84.9 (README)",)),
        "conv2former_b.in1k": _cfg(notes=("top-1 84.4 (README)",)),
        "conv2former_b.in22k_ft_in1k": _cfg(notes=("top-1 86.2 (README)", "official 22k factory uses kernel_size=7")),
        "conv2former_b.in22k_ft_in1k_384": _cfg_384(notes=("top-1 87.0 (README)", "kernel may be 7: infer_kernel_size")),
        "conv2former_l.in22k_ft_in1k": _cfg(notes=("top-1 87.0 (README)",)),
        "conv2former_l.in22k_ft_in1k_384": _cfg_384(notes=("top-1 87.7 (README)",)),
    }
)


@register_model
def conv2former_n(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-N: kernel 7 (11 before 2025-01-02), dims 64-512, depths 2-2-8-2."""
    model_args = dict(kernel_size=7, dims=(64, 128, 256, 512), depths=(2, 2, 8, 2))
    return _create_conv2former("conv2former_n", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv2former_t(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-T: kernel 11, dims 72-576, depths 3-3-12-3."""
    model_args = dict(kernel_size=11, dims=(72, 144, 288, 576), depths=(3, 3, 12, 3))
    return _create_conv2former("conv2former_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv2former_s(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-S: kernel 11, dims 72-576, depths 4-4-32-4."""
    model_args = dict(kernel_size=11, dims=(72, 144, 288, 576), depths=(4, 4, 32, 4))
    return _create_conv2former("conv2former_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv2former_b(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-B: kernel 11, dims 96-768, depths 4-4-34-4."""
    model_args = dict(kernel_size=11, dims=(96, 192, 384, 768), depths=(4, 4, 34, 4))
    return _create_conv2former("conv2former_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def conv2former_l(pretrained: bool = False, **kwargs) -> Conv2Former:
    """Conv2Former-L: kernel 11, dims 128-1024, depths 4-4-48-4."""
    model_args = dict(kernel_size=11, dims=(128, 256, 512, 1024), depths=(4, 4, 48, 4))
    return _create_conv2former("conv2former_l", pretrained=pretrained, **dict(model_args, **kwargs))
