"""Exact fast paths: transformations of a private copy of the model that change the maps by float rounding only."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from erf_tools.engine.engine import frozen_eval
from erf_tools.layers.batchnorm import fold_batchnorm
from erf_tools.layers.fft_conv import FFT_DEPTHWISE_MIN_KERNEL, use_fft_depthwise
from erf_tools.layers.helpers import module_device
from erf_tools.targets import Target

__all__ = ["TargetRemovedError", "exact_fast_paths", "prepare_model"]


class TargetRemovedError(ValueError):
    """Re-parameterisation would remove a module that is a target of the measurement."""


def exact_fast_paths(model: nn.Module) -> dict[str, Any]:
    """The fast paths of :func:`prepare_model` that apply to ``model`` (what ``measure_erf(fast=True)`` uses).

    All change the maps by float rounding only: NHWC layout, BN folding, ``structural_reparam()`` where the model
    has one (RepLKNet), FFTs for depthwise kernels of at least :data:`FFT_DEPTHWISE_MIN_KERNEL` pixels.
    """
    return {"channels_last": True, "fold_bn": True,
            "reparameterize": callable(getattr(model, "structural_reparam", None)),
            "fft_depthwise": FFT_DEPTHWISE_MIN_KERNEL}


def prepare_model(
    model: nn.Module,
    targets: Sequence[Target],
    input_hw: tuple[int, int],
    *,
    reparameterize: bool = False,
    fold_bn: bool = False,
    fft_depthwise: int | None = None,
    channels_last: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The module to measure: ``model`` itself, or a transformed private copy when a fast path is asked for.

    The caller's module is never modified. All transformations are exact in real arithmetic (the ERF differs by
    float rounding only): ``reparameterize`` calls ``structural_reparam()`` (RepLKNet-style models: large + small
    kernel and BN merged into one conv), ``fold_bn`` folds eval BNs into convs (:func:`fold_batchnorm`),
    ``fft_depthwise`` switches large depthwise convs to FFTs (:func:`use_fft_depthwise`), ``channels_last``
    stores the weights NHWC (faster oneDNN/cuDNN kernels). Returns the module and a record of what was done.
    """
    info: dict[str, Any] = {}
    can_reparameterize = callable(getattr(model, "structural_reparam", None))
    if reparameterize and not can_reparameterize:
        warnings.warn(f"{type(model).__name__} has no structural_reparam(); measured without re-parameterisation",
                      stacklevel=3)
    if channels_last and all(t.is_contiguous(memory_format=torch.channels_last)
                             for t in list(model.parameters()) + list(model.buffers()) if t.dim() == 4):
        channels_last = False  # already NHWC: nothing to convert
    if not ((reparameterize and can_reparameterize) or fold_bn or fft_depthwise or channels_last):
        return model, info
    work = copy.deepcopy(model)
    names = [t.module_name for t in targets]
    if reparameterize and can_reparameterize:
        work.structural_reparam()
        info["reparameterized"] = True
        present = dict(work.named_modules())
        lost = [n for n in names if n not in present]
        if lost:
            raise TargetRemovedError(f"re-parameterisation removes the target module(s) {lost}; measure them without "
                             "reparameterize=True")
    if fold_bn:
        example = torch.zeros(1, 3, *input_hw, device=module_device(work))
        with frozen_eval(work):
            info["folded_batchnorms"] = len(fold_batchnorm(work, example, exclude=names))
    if fft_depthwise:
        info["fft_depthwise_convs"] = len(use_fft_depthwise(work, int(fft_depthwise), exclude=names))
    if channels_last:
        work = work.to(memory_format=torch.channels_last)
    return work, info
