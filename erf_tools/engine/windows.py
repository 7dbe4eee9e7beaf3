"""Input windows for early targets: compute a target whose receptive field is small on the part of the input that
holds it.

The backward pass of an early target (ResNet ``layer1`` at 224: a 35-pixel field) costs as much per pixel as that of
the last one, but the gradient is zero outside its receptive field. :func:`plan_windows` proposes windows from the
layers the first forward ran (:class:`~erf_tools.receptive_field.LayerLog`) and the operators it dispatched
(:class:`OperatorLog`); the engine adopts one only after :func:`same_gradient` confirms it on the first batch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from erf_tools.layers.fft_conv import inside_fft_convolution
from erf_tools.receptive_field import LayerLog
from erf_tools.targets import Target

__all__ = ["LOCAL_OPERATORS", "InputWindow", "OperatorLog", "plan_windows", "same_gradient"]


#: Operators that act locally on spatial maps (pointwise, convolutions, pools, eval BN, channel concatenation): a
#: feature map computed only through them depends on a bounded window of the input. Reshapes, reductions over space,
#: attention, sampling, FFTs and anything else are not in the list, and targets behind them are never cropped.
LOCAL_OPERATORS = frozenset({
    "aten.convolution.default", "aten._native_batch_norm_legit_no_training.default", "aten.native_batch_norm.default",
    "aten.relu.default", "aten.relu_.default", "aten.gelu.default", "aten.gelu_.default", "aten.silu.default",
    "aten.silu_.default", "aten.sigmoid.default", "aten.sigmoid_.default", "aten.hardswish.default",
    "aten.hardswish_.default", "aten.hardsigmoid.default", "aten.hardtanh.default", "aten.hardtanh_.default",
    "aten.leaky_relu.default", "aten.leaky_relu_.default", "aten.elu.default", "aten.elu_.default",
    "aten.clamp.default", "aten.clamp_.default", "aten.clamp_min.default", "aten.clamp_min_.default",
    "aten.threshold.default", "aten.tanh.default", "aten.add.Tensor", "aten.add_.Tensor", "aten.mul.Tensor",
    "aten.mul_.Tensor", "aten.sub.Tensor", "aten.sub_.Tensor", "aten.div.Tensor", "aten.div_.Tensor",
    "aten.add.Scalar", "aten.mul.Scalar", "aten.neg.default", "aten.max_pool2d_with_indices.default",
    "aten.max_pool2d.default", "aten.avg_pool2d.default", "aten._to_copy.default", "aten.clone.default",
    "aten.copy_.default", "aten.detach.default", "aten.alias.default", "aten.empty_like.default",
    "aten.zeros_like.default", "aten.empty.memory_format", "aten.cat.default",
})


class OperatorLog(TorchDispatchMode):
    """Names of the operators a forward runs, with the position at which each target was produced."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, len(self.names))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if inside_fft_convolution():  # inside an FFT-computed (zero-padded, linear) convolution
            name = "aten.convolution.default"
        elif name == "aten.cat.default":  # concatenation along channels only
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
            name = name if dim in (1, -3) else "aten.cat.default (spatial)"
        self.names.append(name)
        return func(*args, **(kwargs or {}))

    def local_until(self, position: int) -> bool:
        return all(name in LOCAL_OPERATORS for name in self.names[:position])


@dataclass(frozen=True)
class InputWindow:
    """An input window that contains the whole receptive field of a target's centre unit, and that unit's index
    in the feature map of the window.

    Why: the backward pass of an early target (ResNet ``layer1`` at 224: a 35-pixel field) costs as much per pixel
    as that of the last one, but the gradient is zero outside its receptive field. Running the model on the window
    alone gives the same centre activation and the same gradient when every operator up to the target is local
    (checked: :data:`LOCAL_OPERATORS`), the window starts on a multiple of the target's total stride (the
    sampling grids line up) and its size is congruent to the input size modulo that stride (every layer sees the
    same size parity, hence the same padding). The window is the field computed from the layers the forward ran,
    summed over all of them (a bound for every path), plus one stride of margin; on the first batch the engine
    also computes the full gradient and keeps the window only if the full gradient is zero outside it and equal
    inside to float rounding.
    """

    top: int
    left: int
    height: int
    width: int
    unit: tuple[int, int]


def same_gradient(full: torch.Tensor, cropped: torch.Tensor, crop: InputWindow) -> bool:
    """Whether a window's gradient reproduces the full one: nothing outside the window (exactly zero with direct
    convolutions; FFT-computed ones spread rounding noise of ~1e-7 of the peak everywhere, hence the 1e-6
    allowance) and correlation ≥ 0.9999 inside (float32 rounding of other kernel choices stays far above that; a
    wrong window does not)."""
    outside = full.clone()
    outside[:, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width] = 0
    if float(outside.abs().max()) > 1e-6 * float(full.abs().max()):
        return False
    a, b = full.double().flatten(), cropped.double().flatten()
    if not bool(a.any()) and not bool(b.any()):
        return True
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return denominator > 0 and float(a @ b) / denominator >= 0.9999


def plan_windows(targets: Sequence[Target], geometry: Mapping[str, Any], log: LayerLog, ops: OperatorLog,
                 input_hw: tuple[int, int]) -> dict[str, InputWindow]:
    """Windows of the input that contain the whole receptive field of a target's centre unit (see
    :class:`InputWindow`), for targets reached through local operators only and whose window is at most half the
    input."""
    crops = {}
    for target in targets:
        name = target.module_name
        unit_geometry = geometry[name]
        if name not in ops.marks or not ops.local_until(ops.marks[name]) or unit_geometry.rf_centre is None:
            continue
        events = log.events[: log.marks.get(name, len(log.events))]
        spans = []
        for axis in (0, 1):
            stride = unit_geometry.stride[axis]
            if stride != int(stride) or stride < 1:
                break
            stride, size = int(stride), input_hw[axis]
            # every spatial layer up to the target widens the field (a sum over all layers bounds every path)
            extent = 1 + sum((e.kernel[axis] - 1) * e.dilation[axis] * math.ceil(size / e.in_hw[axis])
                             for e in events)
            centre = unit_geometry.rf_centre[axis]
            low = max(math.floor(centre - (extent - 1) / 2) - stride, 0)
            high = min(math.ceil(centre + (extent - 1) / 2) + stride, size - 1)
            origin = low // stride * stride
            # keep length ≡ size (mod stride): every layer then sees the same size parity (same padding)
            length = size - (origin + size - high - 1) // stride * stride
            spans.append((origin, length, unit_geometry.unit[axis] - origin // stride))
        if len(spans) == 2 and spans[0][1] * spans[1][1] <= 0.5 * input_hw[0] * input_hw[1]:
            (top, height, row), (left, width, col) = spans
            crops[name] = InputWindow(top, left, height, width, (row, col))
    return crops
