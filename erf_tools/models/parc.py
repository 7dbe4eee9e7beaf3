"""ParC (position-aware circular convolution) and the ParC networks: ParC-ConvNeXt and ParC-ResNet50.

ParC (Zhang et al., "ParC-Net", ECCV 2022) mixes tokens along a whole image axis: a circular cross-correlation whose
kernel is as long as the feature map, after adding a learnable position embedding ``pe`` that varies along that
axis. Its receptive field is global along the axis and wraps around the border, and the position embedding breaks
translation equivariance, which is exactly why ParC networks are interesting ERF subjects.

Two exact forms of the same operator are implemented (per channel c, direction ``'H'``, length L = H):

* spatial (the official form): ``x_p = x + pe``; append the first L-1 rows after the last one and run a valid
  (L, 1) convolution: ``y[c, i, j] = b[c] + sum_k w[c, k] * x_p[c, (i + k) mod L, j]``;
* Fast-ParC (Yang et al., arXiv 2210.04020): ``y = irfft(rfft(x_p) * conj(rfft(w)), n=L) + b``. The ``conj`` is
  required because the spatial op is a cross-correlation, not a convolution.

The operator lives in :mod:`erf_tools.layers.parc`. Both forms agree to float rounding; its ``FFT_MIN_LENGTH`` holds the crossover measured by ``bench/bench_parc.py`` and the
``'auto'`` path picks the faster one per call. The official ParC ConvNets have *static* kernels sized for a 224 input
(K = 14 in stage 3, 7 in stage 4) and only run at 224. To measure ERFs at other sizes (the RepLKNet protocol uses
1024) the stored kernel and position embedding are treated as the papers' *meta kernel* and resized to the runtime
feature length by bilinear interpolation with ``align_corners=True`` (as in the EdgeFormer code). That is the identity
at the native size, so official weights load unchanged and reproduce the official 224 outputs exactly; at other
sizes it is an extrapolation of networks trained at 224 only, and results should say so.

Code direction names are kept for weight compatibility: ``'H'`` runs along the height (kernel (K, 1)), ``'W'`` along
the width (kernel (1, K)). ParC-ConvNeXt uses depthwise ParC, ParC-ResNet50 uses dense (groups=1) ParC.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, LayerNorm2d, create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from erf_tools.layers.parc import ParC, ParCPath
from erf_tools.layers.staged import MeanNormHeadBackbone
from erf_tools.models.common import unwrap_checkpoint

__all__ = ["ParCConvNeXt", "ParCResNet", "checkpoint_filter_fn"]


class ParCConvNeXtBlock(nn.Module):
    """ConvNeXt block; in ParC blocks the 7x7 depthwise conv becomes [ParC-H on C/2 ‖ ParC-W on C/2].

    Official ``Block`` / ``ParC_ConvNext_Block``: token mixer (NCHW) → permute → ``norm`` LN → ``pwconv1`` (C→4C) →
    GELU → ``pwconv2`` (4C→C) → layer scale ``gamma`` → DropPath → residual. ``meta_kernel_size=None`` keeps the
    ``dwconv`` 7x7; an int makes it a ParC block whose depthwise ParC kernels have that meta size.
    """

    def __init__(
        self,
        dim: int,
        meta_kernel_size: int | None = None,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        parc_path: ParCPath = "auto",
    ) -> None:
        super().__init__()
        if meta_kernel_size is None:
            self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        else:
            if dim % 2:
                raise ValueError(f"a ParC block splits its channels in two halves; dim={dim} is odd")
            self.gcc_H = ParC(dim // 2, "H", meta_kernel_size, groups=dim // 2, path=parc_path)
            self.gcc_W = ParC(dim // 2, "W", meta_kernel_size, groups=dim // 2, path=parc_path)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.register_parameter("gamma", None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def is_parc(self) -> bool:
        return hasattr(self, "gcc_H")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.is_parc:
            x_h, x_w = torch.chunk(x, 2, dim=1)
            x = torch.cat((self.gcc_H(x_h), self.gcc_W(x_w)), dim=1)
        else:
            x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ParCConvNeXt(MeanNormHeadBackbone):
    """ParC-ConvNeXt (official ``ParC_ConvNeXt``): ConvNeXt with ParC blocks in the last third of stages 3 and 4.

    Stage i's blocks with index ≥ ``ParC_insert_locs[i]`` are ParC blocks with meta kernel ``stages_rs[i]`` (the
    stage's feature size at 224). Argument names follow the official constructor so its keyword arguments (and the
    conformance fixtures' ``constructor_kwargs``) work unchanged. ``forward_features`` returns the ``stages[3]``
    spatial map (the ERF target), unlike the official pooled vector; ``forward_head`` pools, normalises and
    classifies, so ``model(x)`` equals the official logits.
    """

    erf_target = "stages.3"
    nchw_error = "ParC-ConvNeXt intermediates are NCHW only"
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
        ParC_insert_locs: Sequence[int] = (3, 3, 6, 2),  # noqa: N803 - official argument name
        stages_rs: Sequence[int] = (56, 28, 14, 7),
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        parc_path: ParCPath = "auto",
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"ParC-ConvNeXt pools by spatial mean ('avg') or not at all (''), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )

        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        self.feature_info = []
        cursor = 0
        for i, depth in enumerate(depths):
            blocks = [
                ParCConvNeXtBlock(
                    dims[i],
                    meta_kernel_size=stages_rs[i] if j >= ParC_insert_locs[i] else None,
                    drop_path=rates[cursor + j],
                    layer_scale_init_value=layer_scale_init_value,
                    parc_path=parc_path,
                )
                for j in range(depth)
            ]
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
            cursor += depth

        self.init_head(dims[-1], num_classes, drop_rate, head_init_scale, 1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# ParC-ResNet50


class Bottleneck(nn.Module):
    """torchvision ResNet-v1.5 bottleneck (stride on the 3x3), as used by the official ParC-ResNet50."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


class ParCBottleneck(nn.Module):
    """Official ``ParC_block``: the bottleneck's 3x3 conv becomes [dense ParC-H on W/2 ‖ dense ParC-W on W/2].

    conv1 1x1 → bn1 → ReLU → split → ``parc_H`` ‖ ``parc_W`` → concat → bn2 → ReLU → conv3 1x1 → bn3 → + identity →
    ReLU. Always stride 1 without a downsample (block 0 of every layer is a normal bottleneck).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        meta_kernel_size: int,
        groups: int = 1,
        base_width: int = 64,
        parc_path: ParCPath = "auto",
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        if width % 2:
            raise ValueError(f"a ParC block splits its channels in two halves; width={width} is odd")
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.parc_H = ParC(width // 2, "H", meta_kernel_size, groups=1, path=parc_path)
        self.parc_W = ParC(width // 2, "W", meta_kernel_size, groups=1, path=parc_path)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.relu(self.bn1(self.conv1(x)))
        x_h, x_w = torch.chunk(x, 2, dim=1)
        x = torch.cat((self.parc_H(x_h), self.parc_W(x_w)), dim=1)
        x = self.relu(self.bn2(x))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


#: Feature size of layer1..layer4 at the native 224 input: the ParC meta-kernel lengths (hard-coded officially).
PARC_RESNET_STAGE_SIZES = (56, 28, 14, 7)


class ParCResNet(nn.Module):
    """ParC-ResNet50 (official ``ResNet`` of ``ParC_resnet50.py``): torchvision ResNet with dense ParC blocks.

    In layer3 and layer4 the blocks with index ≥ ``parc_insert_locs[i]`` are :class:`ParCBottleneck` (meta kernel
    14 and 7); ``parc_insert_locs[0:2]`` are unused, as officially. Argument names follow the official constructor
    (``block`` may be the string ``'Bottleneck'``, as stored in the conformance fixture). ``forward_features`` returns
    the ``layer4`` output (the ERF target); ``forward_head`` pools and classifies.
    """

    erf_target = "layer4"

    def __init__(
        self,
        block: str | type[nn.Module] = "Bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        parc_insert_locs: Sequence[int] = (3, 4, 3, 2),
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        parc_path: ParCPath = "auto",
    ) -> None:
        super().__init__()
        if block not in ("Bottleneck", Bottleneck):
            raise ValueError(f"ParC-ResNet is defined with Bottleneck blocks only, got {block!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = 64

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = []
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            parc_from = parc_insert_locs[i] if i >= 2 else depth
            stride = 1 if i == 0 else 2
            layer = self._make_layer(planes, depth, stride, parc_from, PARC_RESNET_STAGE_SIZES[i], parc_path)
            self.add_module(f"layer{i + 1}", layer)
            self.feature_info.append(dict(num_chs=planes * 4, reduction=4 * 2**i, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = 512 * Bottleneck.expansion
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (Bottleneck, ParCBottleneck)):
                    nn.init.zeros_(m.bn3.weight)

    def _make_layer(
        self, planes: int, depth: int, stride: int, parc_from: int, meta_kernel_size: int, parc_path: ParCPath
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        blocks: list[nn.Module] = [
            Bottleneck(self.inplanes, planes, stride, downsample, groups=self.groups, base_width=self.base_width)
        ]
        self.inplanes = planes * Bottleneck.expansion
        for j in range(1, depth):
            if j >= parc_from:
                blocks.append(
                    ParCBottleneck(
                        self.inplanes, planes, meta_kernel_size, self.groups, self.base_width, parc_path=parc_path
                    )
                )
            else:
                blocks.append(Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
        return nn.Sequential(*blocks)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace the classifier; the ERF does not depend on it."""
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of layer1..layer4 (timm interface; ``norm`` is accepted and has nothing to apply)."""
        if output_fmt != "NCHW":
            raise ValueError("ParC-ResNet intermediates are NCHW only")
        stages = self._stages()
        take_indices, max_index = feature_take_indices(len(stages), indices)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        intermediates = []
        last = max_index if stop_early else len(stages) - 1
        for i in range(last + 1):
            x = stages[i](x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the layers after the last requested one (and the head), as timm's feature wrappers expect."""
        take_indices, max_index = feature_take_indices(4, indices)
        for i in range(max_index + 1, 4):
            setattr(self, f"layer{i + 1}", nn.Identity())
        if prune_head or max_index < 3:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``layer4`` output after its final ReLU, (N, 2048, H/32, W/32): the ERF target map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self._stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, configs and registration

_EDGEFORMER_V2_KEYS = re.compile(r"^(stages\.\d+\.\d+)\.gcc_conv_(1H|2W)\.(weight|bias|meta_pe)$")


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """Bare state dict for ``model`` from an official checkpoint (``{'model': ...}``, EMA, DDP ``module.`` prefix).

    For ParC-ConvNeXt it also renames the edgeformer_v2 ``convnext_gcc_cvx`` ParC keys
    (``gcc_conv_1H.{weight,bias,meta_pe}`` → ``gcc_H.{gcc_conv.weight,gcc_conv.bias,pe}``, ``gcc_conv_2W`` →
    ``gcc_W``), the same architecture under other names; strict loading then checks every shape.
    """
    state = unwrap_checkpoint(state_dict)
    if not isinstance(model, ParCConvNeXt):
        return state
    renamed = {}
    for key, value in state.items():
        match = _EDGEFORMER_V2_KEYS.match(key)
        if match:
            block, which, leaf = match.groups()
            op = "gcc_H" if which == "1H" else "gcc_W"
            key = f"{block}.{op}." + {"weight": "gcc_conv.weight", "bias": "gcc_conv.bias", "meta_pe": "pe"}[leaf]
        renamed[key] = value
    return renamed


def _create_parc_convnext(variant: str, pretrained: bool = False, **kwargs) -> ParCConvNeXt:
    return build_model_with_cfg(
        ParCConvNeXt,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _create_parc_resnet(variant: str, pretrained: bool = False, **kwargs) -> ParCResNet:
    return build_model_with_cfg(
        ParCResNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    """ConvNeXt recipe (the ParC ConvNets were trained with it): 224, crop 0.875, bicubic, ImageNet mean/std.

    No public weights exist for these models (the official factories raise on ``pretrained=True``); to load a local
    file pass ``pretrained=True, pretrained_cfg_overlay=dict(file=path)`` or use ``erf_tools.weights.load_checkpoint``.
    ``fixed_input_size`` stays False: the meta-kernel interpolation lets the nets run at any size.
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "unknown",
        "paper_ids": "arXiv:2203.03952",
        "origin_url": "https://github.com/hkzhang-git/ParC-Net",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "parc_convnext_xt.in1k": _cfg(
            first_conv="downsample_layers.0.0",
            classifier="head",
            notes=("ImageNet-1k top-1 78.3 (README); no public weights", "trained at 224 with static kernels"),
        ),
        "parc_convnext_t.in1k": _cfg(
            first_conv="downsample_layers.0.0",
            classifier="head",
            notes=("ConvNeXt-T widths; no official factory, accuracy or weights",),
        ),
        "parc_resnet50.in1k": _cfg(
            first_conv="conv1",
            classifier="fc",
            notes=("ImageNet-1k top-1 79.6 (README, ConvNeXt recipe); no public weights", "official: parc_res50"),
        ),
    }
)


@register_model
def parc_convnext_xt(pretrained: bool = False, **kwargs) -> ParCConvNeXt:
    """ParC-ConvNeXt-XT: ConvNeXt-XT widths, ParC in stage 3 blocks 6-8 (K=14) and stage 4 block 2 (K=7)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384), ParC_insert_locs=(3, 3, 6, 2))
    return _create_parc_convnext("parc_convnext_xt", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def parc_convnext_t(pretrained: bool = False, **kwargs) -> ParCConvNeXt:
    """ParC-ConvNeXt-T: the same class at ConvNeXt-T widths (no official factory)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), ParC_insert_locs=(3, 3, 6, 2))
    return _create_parc_convnext("parc_convnext_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def parc_resnet50(pretrained: bool = False, **kwargs) -> ParCResNet:
    """ParC-ResNet50 (official ``parc_res50``): dense ParC in layer3 blocks 3-5 (K=14) and layer4 block 2 (K=7)."""
    model_args = dict(layers=(3, 4, 6, 3), parc_insert_locs=(3, 4, 3, 2))
    return _create_parc_resnet("parc_resnet50", pretrained=pretrained, **dict(model_args, **kwargs))
