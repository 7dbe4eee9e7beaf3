"""Where a feature-map unit's receptive field is centred in the input.

Receptive-field arithmetic as in Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural
Networks", Distill 2019.

For a path of layers (k_l, s_l, p_l, d_l), unit i of the output is centred at c0 + i·S in input pixels, with
S = Π s_l and c0 = Σ_l (−p_l + d_l(k_l−1)/2)·Π_{m<l} s_m. Padded CNNs (c0 = 0) put the centre unit of a 7×7 map
at pixel 96 of a 224 input, 15.5 px up-left of the image centre, so ERF statistics about (H//2, W//2) are biased.

The path is read from the convolutions and pools the forward pass actually runs (hooks, in execution order). A
layer counts when its input has the current resolution of the main path; parallel branches that reach a resolution
the path has already left (ResNet shortcuts) are skipped. Resolution changes done without a convolution or pool
(Swin patch merging) are treated as non-overlapping 2×2-style merges, adding (r−1)/2 · S.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from erf_tools.layers.helpers import as_pair

_SPATIAL_TYPES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class LayerEvent:
    """One spatial layer execution: input and output size, and its geometry per axis (row, column)."""

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


class LayerLog:
    """Records the spatial layers a forward pass runs, with markers for when each target was produced."""

    def __init__(self, model: nn.Module) -> None:
        self.events: list[LayerEvent] = []
        self.marks: dict[str, int] = {}
        self._handles = [
            m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, _SPATIAL_TYPES)
        ]

    def _record(self, module: nn.Module, args, output) -> None:
        if not args or not hasattr(args[0], "shape") or args[0].dim() != 4 or output.dim() != 4:
            return
        padding = module.padding
        if isinstance(padding, str):  # "same" / "valid" convolutions
            padding = tuple((d * (k - 1)) // 2 for k, d in zip(module.kernel_size, module.dilation)) \
                if padding == "same" else (0, 0)
        dilation = getattr(module, "dilation", 1)
        self.events.append(
            LayerEvent(
                in_hw=tuple(args[0].shape[-2:]),
                out_hw=tuple(output.shape[-2:]),
                kernel=as_pair(module.kernel_size),
                stride=as_pair(module.stride),
                padding=as_pair(padding),
                dilation=as_pair(dilation),
            )
        )

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, len(self.events))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def path_geometry(
    events: list[LayerEvent], input_hw: tuple[int, int], feature_hw: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(c0, S) per axis (row, column) of the main path from the input to a feature map of size ``feature_hw``."""
    offsets, strides = [], []
    for axis in (0, 1):
        current = input_hw[axis]
        offset, stride = 0.0, 1.0
        for event in events:
            if event.in_hw[axis] != current:  # a parallel branch from a resolution the path has left
                continue
            k, s, p, d = event.kernel[axis], event.stride[axis], event.padding[axis], event.dilation[axis]
            offset += (-p + d * (k - 1) / 2) * stride
            stride *= s
            current = event.out_hw[axis]
        observed = input_hw[axis] / feature_hw[axis]
        if round(observed / stride) > 1:  # downsampling by layers that are not convolutions or pools
            factor = observed / stride
            offset += (factor - 1) / 2 * stride
            stride = observed
        offsets.append(offset)
        strides.append(stride)
    return (offsets[0], offsets[1]), (strides[0], strides[1])


def unit_centre(
    unit: tuple[int, int], offsets: tuple[float, float], strides: tuple[float, float]
) -> tuple[float, float]:
    """Input-pixel (row, column) centre of output unit ``unit``: c0 + i·S."""
    return offsets[0] + unit[0] * strides[0], offsets[1] + unit[1] * strides[1]
