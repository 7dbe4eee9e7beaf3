"""The timm interface shared by "``downsample_layers[i]`` then ``stages[i]``" backbones (ConvNeXt-shaped nets).

Conv2Former, ParC-ConvNeXt and UniConvNet keep their official parameter names, so their stems and downsamplers sit
in a ``downsample_layers`` ModuleList beside a ``stages`` ModuleList instead of inside the stages. timm's generic
feature code cannot walk that layout, so each family needs its own ``forward_intermediates`` (used by
``features_only`` with ``feature_cls="getter"``), ``prune_intermediate_layers``, ``get_classifier`` and
``reset_classifier``. They are written once here; a family states only what really differs as class attributes or an
override:

* ``classifier_name``: the attribute holding the classifier (``"pred"`` in Conv2Former, ``"head"`` elsewhere);
* ``nchw_error``: the message for a non-NCHW ``output_fmt``;
* ``_check_pool``: which ``global_pool`` values ``reset_classifier`` accepts;
* for pruning (:class:`PrunableStagedBackbone`): ``head_modules`` (spatial head blocks that go with the classifier,
  Conv2Former's ``head``) and ``final_norm_name`` (a norm on the pooled vector, ParC-ConvNeXt's ``norm``).
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["NUM_STAGES", "MeanNormHeadBackbone", "PrunableStagedBackbone", "StagedBackbone", "convnext_init"]

#: Every family here has a stem + 3 downsamplers and four stages; pruning below the last one also drops the head.
NUM_STAGES = 4


class StagedBackbone(nn.Module):
    """Base for models with ``downsample_layers``, ``stages``, ``feature_info`` and a classifier ``classifier_name``.

    The subclass builds those attributes (and ``num_classes``, ``global_pool``, ``head_hidden_size``) in its
    ``__init__``; this class adds no parameters, so state-dict keys are the subclass's own.
    """

    #: Attribute name of the classifier (a ``Linear``, or ``Identity`` with ``num_classes=0``).
    classifier_name: str = "head"
    #: ``ValueError`` message of :meth:`forward_intermediates` for an ``output_fmt`` other than ``"NCHW"``.
    nchw_error: str = "intermediates are NCHW only"

    downsample_layers: nn.ModuleList
    stages: nn.ModuleList
    feature_info: list[dict]

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        """Reject a ``global_pool`` the head cannot apply; by default spatial mean (``'avg'``) or none (``''``)."""
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (e.g. for a 22k checkpoint, or 0 for none); the ERF does not depend on it.

        The new ``Linear`` takes ``head_hidden_size`` inputs: the width of the pooled vector, which is
        ``num_features`` except where a head block widens it (Conv2Former's 1280-wide ``head``).
        """
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        setattr(self, self.classifier_name, classifier)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs ``stages[i](downsample_layers[i](x))``, NCHW (timm interface).

        Args:
            x: input images.
            indices: last n stages if int, all if None, the listed stage indices if a sequence.
            norm: accepted for timm compatibility and ignored: these families have no final norm on spatial maps
                (their final norms and head blocks act after the last stage and are never applied here).
            stop_early: stop after the last requested stage.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(self.nchw_error)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last = max_index if stop_early else len(self.stages) - 1
        for i in range(last + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates


class PrunableStagedBackbone(StagedBackbone):
    """:class:`StagedBackbone` with ``prune_intermediate_layers``, which timm's ``features_only`` wrapper calls.

    A separate class because not every family can be pruned this way: UniConvNet's head only pools by the mean, so
    ``reset_classifier(0, '')`` is refused there, and it has never offered pruning.
    """

    #: Spatial head blocks between the last stage and the pooling, replaced by ``Identity`` with the classifier.
    head_modules: tuple[str, ...] = ()
    #: A final norm on the pooled vector, replaced by ``Identity`` with ``prune_norm`` or when stages are cut.
    final_norm_name: str | None = None

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested one (and the head), as timm's feature wrappers expect."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        cut = max_index < NUM_STAGES - 1
        if self.final_norm_name is not None and (prune_norm or cut):
            setattr(self, self.final_norm_name, nn.Identity())
        if prune_head or cut:
            for name in self.head_modules:
                setattr(self, name, nn.Identity())
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take_indices


class MeanNormHeadBackbone(PrunableStagedBackbone):
    """A staged backbone with ConvNeXt's head: spatial mean, a norm on the pooled vector (``norm``), dropout
    (``head_drop``), the classifier (``head``). ParC-ConvNeXt, SLaK and UniRepLKNet share it; the ERF target is the
    ``stages[3]`` output that :meth:`forward_features` returns."""

    def init_head(self, width: int, num_classes: int, drop_rate: float, head_init_scale: float,
                  eps: float = 1e-6) -> None:
        """Create ``norm`` (a LayerNorm on the pooled vector), ``head_drop`` and ``head``, then apply
        :func:`convnext_init` to the whole model and scale the classifier by ``head_init_scale`` (the official
        constructors' last steps; call it after every other module exists)."""
        self.norm = nn.LayerNorm(width, eps=eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(convnext_init)
        if isinstance(self.head, nn.Linear) and not self.head.weight.is_meta:
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``stages[3]`` output (N, C3, H/32, W/32), before the mean, the final norm and the head."""
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Spatial mean, final norm, classifier (the official ``forward_features`` + ``head``)."""
        if self.global_pool == "avg":
            x = x.mean((-2, -1))
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convnext_init(module: nn.Module) -> None:
    """ConvNeXt's official init (also SLaK's, UniRepLKNet's and ParC-ConvNeXt's): trunc_normal(std 0.02) for every
    Conv2d/Linear weight, the large kernels included, and zero biases; meta tensors (shapes only) are skipped."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.is_meta:
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

