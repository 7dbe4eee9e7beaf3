"""UniConvNet

Paper: `UniConvNet: Expanding Effective Receptive Field while Maintaining Asymptotically Gaussian Distribution for
ConvNets of Any Scale` - Wang & Xi, ICCV 2025, https://arxiv.org/abs/2508.09000

Official code: ai-paperwithcode/UniConvNet (commit 5d66e89); this implementation is checked against reference forward passes of the official classes (tests/fixtures/conformance).
Parameter names are the official ones so that the released checkpoints load with ``strict=True``.

Each block has three residual branches, each with its own per-channel scale (all initialised to 1e-6):

1. ``attn``: the three-layer Receptive Field Aggregator (official class name ``ConvMod``), NCHW;
2. ``dcn``: UniConvNet's modified DCNv3 (:mod:`erf_tools.layers.dcnv3`) after ``norm1``, channels-last;
3. ``mlp``: Linear(C, 4C) - GELU - Linear(4C, C) after ``norm2``, channels-last.

The two official model files differ only in the DCN group rule: variants A-P2 use 8 channels per group
(``group = C // 8``), N0-XL use 16 (``group = C // 16``); here that is the ``dcn_group_channels`` argument.

Interface (timm convention, differs from the official code): ``forward_features`` returns the *spatial* output of
``stages[3]`` (the map the ERF uses), ``forward_head`` does mean - LayerNorm - Linear, so ``model(x)`` equals the
official logits while the official ``forward_features`` returned the pooled, normalised vector.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from erf_tools.models.common import unwrap_checkpoint
from erf_tools.layers.dcnv3 import DCNv3
from erf_tools.layers.staged import StagedBackbone

__all__ = ["UniConvNet", "UniConvNetBlock", "ReceptiveFieldAggregator", "checkpoint_filter_fn"]

NORM_EPS = 1e-6


def _pointwise(in_chs: int, out_chs: int) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1)


def _depthwise(chs: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(chs, chs, kernel_size, padding=kernel_size // 2, groups=chs)


def _attention_kernel(in_chs: int, kernel_size: int) -> nn.Sequential:
    """``a_n``: 1x1 conv - GELU - depthwise KxK, the large-kernel "attention" map of an aggregator layer."""
    return nn.Sequential(_pointwise(in_chs, in_chs), nn.GELU(), _depthwise(in_chs, kernel_size))


class ReceptiveFieldAggregator(nn.Module):
    """The three-layer Receptive Field Aggregator (RFA; official class ``ConvMod``, state-dict name ``attn``).

    The normalised input is split into four quarters X0..X3. Layer n (kernel 7, 9, 11) builds a large-kernel map
    ``a = a_n(Y)`` from the accumulated features Y, keeps a modulated "amplifier" part ``v_n1(a * v_n(Y))`` and
    adds a 3x3 "discriminator" part ``conv3_n(v_n2(X_n)) + proj_n(a)`` from the next fresh quarter; their concat
    (discriminator first) is the next layer's input. Widths grow q, 2q, 3q, 4q = C, so the receptive field widens
    layer by layer while small kernels keep weight near the centre (the paper's asymptotically Gaussian ERF).
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (7, 9, 11)) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"the aggregator splits channels into quarters; {dim} is not divisible by 4")
        q = dim // 4
        k1, k2, k3 = kernel_sizes
        # Registration order = official state-dict order.
        self.norm1 = LayerNorm2d(dim, eps=NORM_EPS)
        self.a1 = _attention_kernel(q, k1)
        self.v1 = _pointwise(q, q)
        self.v11 = _pointwise(q, q)
        self.v12 = _pointwise(q, q)
        self.conv3_1 = _depthwise(q, 3)
        self.norm2 = LayerNorm2d(2 * q, eps=NORM_EPS)
        self.a2 = _attention_kernel(2 * q, k2)
        self.v2 = _pointwise(2 * q, 2 * q)
        self.v21 = _pointwise(2 * q, 2 * q)
        self.v22 = _pointwise(q, q)
        self.proj2 = _pointwise(2 * q, q)
        self.conv3_2 = _depthwise(q, 3)
        self.norm3 = LayerNorm2d(3 * q, eps=NORM_EPS)
        self.a3 = _attention_kernel(3 * q, k3)
        self.v3 = _pointwise(3 * q, 3 * q)
        self.v31 = _pointwise(3 * q, 3 * q)
        self.v32 = _pointwise(q, q)
        self.proj3 = _pointwise(3 * q, q)
        self.conv3_3 = _depthwise(q, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1, x2, x3 = self.norm1(x).chunk(4, dim=1)

        a = self.a1(x0)
        y = torch.cat([self.conv3_1(self.v12(x1)) + a, self.v11(a * self.v1(x0))], dim=1)

        y = self.norm2(y)
        a = self.a2(y)
        y = torch.cat([self.conv3_2(self.v22(x2)) + self.proj2(a), self.v21(a * self.v2(y))], dim=1)

        y = self.norm3(y)
        a = self.a3(y)
        return torch.cat([self.conv3_3(self.v32(x3)) + self.proj3(a), self.v31(a * self.v3(y))], dim=1)


class UniConvNetBlock(nn.Module):
    """UniConvNet block (official ``Block``): RFA, DCNv3 and MLP residual branches, each with a layer scale.

    ``x + s1*RFA(x)`` (NCHW), then channels-last ``x + s2*DCN(LN(x))`` and ``x + s3*MLP(LN(x))``. One DropPath
    instance serves the three branches, as in the official code.
    """

    def __init__(
        self,
        dim: int,
        dcn_groups: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        # Registration order = official state-dict order: gamma1, gamma2, layer_scale, attn, mlp, norm1, norm2, dcn.
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))  # DCN branch
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))  # MLP branch
        self.layer_scale = nn.Parameter(torch.full((dim,), layer_scale_init_value))  # RFA branch
        self.attn = ReceptiveFieldAggregator(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.norm1 = nn.Sequential(nn.LayerNorm(dim, eps=NORM_EPS))
        self.norm2 = nn.Sequential(nn.LayerNorm(dim, eps=NORM_EPS))
        self.dcn = DCNv3(channels=dim, kernel_size=3, pad=1, group=dcn_groups)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale[:, None, None] * self.attn(x))
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.gamma1 * self.dcn(self.norm1(x)))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def _stem(in_chans: int, dim: int, drop: float) -> nn.Sequential:
    """Two 3x3/s2 convs (C0/2 then C0) with channels-first LayerNorms and a GELU: stride 4, RF 15."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),
        LayerNorm2d(dim // 2, eps=NORM_EPS),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
        LayerNorm2d(dim, eps=NORM_EPS),
        nn.Dropout(drop),
    )


def _downsample(in_chs: int, out_chs: int) -> nn.Sequential:
    """Channels-first LayerNorm, then a 3x3/s2 conv (norm before conv, as in the official code)."""
    return nn.Sequential(LayerNorm2d(in_chs, eps=NORM_EPS), nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1))


class UniConvNet(StagedBackbone):
    """UniConvNet: stem + 3 downsamplers (``downsample_layers``) and 4 stages of :class:`UniConvNetBlock`.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for no classifier).
        depths: blocks per stage.
        dims: channels per stage.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        layer_scale_init_value: initial value of the three per-branch scales (the model always uses 1e-6).
        head_init_scale: factor applied to the classifier weight and bias after init (0.001 for 384 fine-tuning).
        drop: dropout rate at the end of the stem (0 in every released model).
        dcn_group_channels: channels per DCN group, 8 for A-P2 and 16 for N0-XL (the only difference between the two
            official model files). Default 16.
        mlp_ratio: MLP expansion.
        global_pool: only ``"avg"`` (the official head pools by the mean).
    """

    #: The map the ERF is measured on: the last stage's spatial output, before pooling, norm and head.
    erf_target = "stages.3"
    nchw_error = "UniConvNet intermediates are NCHW"

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 15, 3),
        dims: Sequence[int] = (64, 128, 256, 512),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        drop: float = 0.0,
        dcn_group_channels: int = 16,
        mlp_ratio: float = 4.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError("UniConvNet has four stages: depths and dims need four entries each")
        bad = [d for d in dims if d % dcn_group_channels or d % 4]
        if bad:
            raise ValueError(
                f"stage widths {bad} are not divisible by 4 and by dcn_group_channels={dcn_group_channels}"
            )
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.dcn_group_channels = dcn_group_channels
        self.num_features = self.head_hidden_size = dims[-1]

        self.downsample_layers = nn.ModuleList(
            [_stem(in_chans, dims[0], drop)] + [_downsample(dims[i - 1], dims[i]) for i in range(1, 4)]
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: also under a meta device
        self.stages = nn.ModuleList()
        self.feature_info = []
        first = 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            self.stages.append(
                nn.Sequential(
                    *[
                        UniConvNetBlock(
                            dim,
                            dcn_groups=dim // dcn_group_channels,
                            drop_path=rates[first + j],
                            layer_scale_init_value=layer_scale_init_value,
                            mlp_ratio=mlp_ratio,
                        )
                        for j in range(depth)
                    ]
                )
            )
            first += depth
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.norm = nn.LayerNorm(dims[-1], eps=NORM_EPS)  # applied to the pooled vector
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(_init_weights)
        for module in self.modules():
            if isinstance(module, DCNv3):
                module.reset_parameters()
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool != "avg":
            raise ValueError(f"UniConvNet pools by the mean before its LayerNorm; global_pool={global_pool!r}")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The official recipe skips weight decay for 1-D parameters (scales, norms, biases); named ones here."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial output of ``stages[3]`` (N, C3, H/32, W/32), before the mean, the LayerNorm and the head."""
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global mean over H, W, then LayerNorm, then the classifier (the official head)."""
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """Official init, step 1: every conv and linear (DCN ones included) trunc-normal std 0.02, bias 0."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: UniConvNet) -> dict[str, torch.Tensor]:
    """Turn an official UniConvNet checkpoint into a state dict for :class:`UniConvNet`.

    Official files are training checkpoints (``{'model': ..., 'optimizer': ..., 'model_ema'?: ...}``); the official
    factories load ``checkpoint['model']`` also for the ``*_ema`` files, so that is preferred here too, with the
    EMA weights (and DDP ``module.`` prefixes) as fallbacks. Keys are already the official names. A classifier of a
    different size (21841-class ImageNet-22k heads) is kept; the loader resizes the model or drops it. A model
    without classifier (``num_classes=0``) drops the head.
    """
    state = unwrap_checkpoint(state_dict)
    if not isinstance(getattr(model, "head", None), nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state


def _create_uniconvnet(variant: str, pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    return build_model_with_cfg(
        UniConvNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # downsample_layers and stages are separate ModuleLists, so features come from forward_intermediates.
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_HF_HUB_ID = "ai-modelwithcode/UniConvNet"


def _cfg(filename: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "hf_hub_id": _HF_HUB_ID,
        "hf_hub_filename": filename,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0",
        "classifier": "head",
        "paper_ids": "arXiv:2508.09000",
        "origin_url": "https://github.com/ai-paperwithcode/UniConvNet",
        **kwargs,
    }


def _cfg_384(filename: str, **kwargs: Any) -> dict[str, Any]:
    # The official eval transform warps to 384x384 without cropping.
    return _cfg(filename, input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash", **kwargs)


# For L and XL the 22k->1k fine-tune is listed first so that the default model has the 1000-class head.
default_cfgs = generate_default_cfgs(
    {
        "uniconvnet_a.in1k": _cfg("uniconvnet_a_1k_224.pth"),
        "uniconvnet_p0.in1k": _cfg("uniconvnet_p0_1k_224_ema.pth"),
        "uniconvnet_p1.in1k": _cfg("uniconvnet_p1_1k_224_ema.pth"),
        "uniconvnet_p2.in1k": _cfg("uniconvnet_p2_1k_224_ema.pth"),
        "uniconvnet_n0.in1k": _cfg("uniconvnet_n0_1k_224_ema.pth"),
        "uniconvnet_n1.in1k": _cfg("uniconvnet_n1_1k_224.pth"),
        "uniconvnet_n2.in1k": _cfg("uniconvnet_n2_1k_224_ema.pth"),
        "uniconvnet_n3.in1k": _cfg("uniconvnet_n3_1k_224_ema.pth"),
        "uniconvnet_t.in1k": _cfg("uniconvnet_t_1k_224_ema.pth"),
        "uniconvnet_t.in1k_384": _cfg_384("uniconvnet_t_1k_384.pth"),
        "uniconvnet_s.in1k": _cfg("uniconvnet_s_1k_224_ema.pth"),
        "uniconvnet_s.in1k_384": _cfg_384("uniconvnet_s_1k_384.pth"),
        "uniconvnet_b.in1k": _cfg("uniconvnet_b_1k_224_ema.pth"),
        "uniconvnet_b.in1k_384": _cfg_384("uniconvnet_b_1k_384.pth"),
        "uniconvnet_l.in22k_ft_in1k_384": _cfg_384("uniconvnet_l_22k_1k_384.pth"),
        "uniconvnet_l.in22k": _cfg("uniconvnet_l_22k_224.pth", num_classes=21841),
        "uniconvnet_xl.in22k_ft_in1k_384": _cfg_384("uniconvnet_xl_22k_1k_384.pth"),
        "uniconvnet_xl.in22k": _cfg("uniconvnet_xl_22k_224.pth", num_classes=21841),
    }
)


@register_model
def uniconvnet_a(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(2, 3, 9, 2), dims=(24, 48, 96, 192), dcn_group_channels=8)
    return _create_uniconvnet("uniconvnet_a", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_p0(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(2, 2, 7, 2), dims=(32, 64, 128, 256), dcn_group_channels=8)
    return _create_uniconvnet("uniconvnet_p0", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_p1(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(2, 3, 6, 3), dims=(32, 64, 128, 256), dcn_group_channels=8)
    return _create_uniconvnet("uniconvnet_p1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_p2(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(3, 3, 11, 3), dims=(32, 64, 128, 256), dcn_group_channels=8)
    return _create_uniconvnet("uniconvnet_p2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_n0(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(2, 2, 7, 2), dims=(48, 96, 192, 384), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_n0", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_n1(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(2, 2, 8, 3), dims=(48, 96, 192, 384), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_n1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_n2(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(3, 3, 11, 3), dims=(48, 96, 192, 384), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_n2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_n3(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(3, 3, 19, 3), dims=(48, 96, 192, 384), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_n3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_t(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(3, 3, 15, 3), dims=(64, 128, 256, 512), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_s(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(3, 3, 17, 3), dims=(80, 160, 320, 640), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_b(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(4, 4, 13, 4), dims=(112, 224, 448, 896), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_l(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(3, 3, 18, 3), dims=(160, 320, 640, 1280), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_l", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniconvnet_xl(pretrained: bool = False, **kwargs: Any) -> UniConvNet:
    model_args = dict(depths=(3, 3, 22, 3), dims=(160, 320, 640, 1280), dcn_group_channels=16)
    return _create_uniconvnet("uniconvnet_xl", pretrained=pretrained, **dict(model_args, **kwargs))
