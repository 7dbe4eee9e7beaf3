"""Where a feature-map unit's receptive field is centred in the input (Luo et al. 2016, §2; Araujo et al. 2019).

For a path of layers (k_l, s_l, p_l, d_l), unit i of the output is centred at c0 + i·S in input pixels, with
S = Π s_l and c0 = Σ_l (−p_l + d_l(k_l−1)/2)·Π_{m<l} s_m, where p_l is the padding *before* the first element.
Padded CNNs (c0 = 0) put the centre unit of a 7×7 map at pixel 96 of a 224 input, 15.5 px up-left of the image
centre, so ERF statistics about (H//2, W//2) are biased. TensorFlow "same" padding puts the odd pad row/column
*after* the image, so each stride-2 layer there has p_l = (k−2)/2 rounded down, not (k−1)/2 (EfficientNet-Lite0:
c0 = −15.5 instead of 0, a centre unit at 127, not 147).

The path is measured, not read from module attributes: a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
records the operators the forward actually runs, in execution order — every convolution (``aten.convolution``,
also transposed), max/average pool and explicit padding (``F.pad``: constant, reflect, replicate) with the sizes
and arguments it ran with. So dynamic "same" padding decided at run time (timm ``Conv2dSame``, ``MaxPool2dSame``,
``AvgPool2dSame``, ``pad_same``, ``nn.Conv2d(padding="same")`` with even kernels), asymmetric ``nn.ZeroPad2d`` and
functional convolutions inside unknown layers are all seen as what they did. A padding counts only when a
convolution or pool consumes the padded size (an FFT convolution pads internally and crops back: no offset).
A convolution or pool *module* whose forward runs none of these operators (an FFT-computed one) is recorded from
its attributes instead.

A layer counts when its input has the current resolution of the main path; parallel branches that reach a
resolution the path has already left (ResNet shortcuts) are skipped. Resolution changes done without a convolution
or pool (Swin patch merging) are treated as non-overlapping 2×2-style merges, adding (r−1)/2 · S.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from erf_tools.layers.helpers import as_pair

_SPATIAL_TYPES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class LayerEvent:
    """One spatial layer execution: input and output size, and its geometry per axis (row, column).

    ``padding`` is the padding before the first element (negative: a crop). A pure padding is an event with
    kernel 1 and stride 1 (``kind="pad"``); it applies only to a later convolution or pool of its output size.
    ``transposed`` marks a transposed convolution (stride = upsampling factor).
    """

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kind: str = "layer"
    transposed: bool = False


def _argument(args, kwargs, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return (kwargs or {}).get(name, default)


def operator_event(func, args, kwargs, output) -> LayerEvent | None:
    """The :class:`LayerEvent` of one ATen operator call on an N×C×H×W tensor, or None if it is not spatial."""
    packet = getattr(getattr(func, "overloadpacket", func), "__name__", str(func))
    x = args[0] if args else None
    if packet == "max_pool2d_with_indices" and isinstance(output, (tuple, list)):
        output = output[0]
    if x is None or not hasattr(x, "dim") or x.dim() != 4 or not hasattr(output, "dim") or output.dim() != 4:
        return None
    in_hw, out_hw = tuple(x.shape[-2:]), tuple(output.shape[-2:])
    if packet == "convolution":
        weight = args[1]
        stride, padding, dilation = (_argument(args, kwargs, i, n, 1) for i, n in ((3, "stride"), (4, "padding"),
                                                                                    (5, "dilation")))
        transposed = bool(_argument(args, kwargs, 6, "transposed", False))
        return LayerEvent(in_hw, out_hw, tuple(weight.shape[-2:]), as_pair(stride), as_pair(padding), as_pair(dilation),
                          transposed=transposed)
    if packet in ("max_pool2d_with_indices", "max_pool2d", "avg_pool2d"):
        kernel = as_pair(_argument(args, kwargs, 1, "kernel_size", 1))
        stride = _argument(args, kwargs, 2, "stride", None)
        stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else as_pair(stride)
        padding = as_pair(_argument(args, kwargs, 3, "padding", 0))
        dilation = as_pair(_argument(args, kwargs, 4, "dilation", 1)) if packet != "avg_pool2d" else (1, 1)
        return LayerEvent(in_hw, out_hw, kernel, stride, padding, dilation)
    if packet in ("constant_pad_nd", "reflection_pad2d", "replication_pad2d"):
        pad = list(_argument(args, kwargs, 1, "pad" if packet == "constant_pad_nd" else "padding", []))
        pad += [0] * (4 - len(pad))  # (left, right, top, bottom): last dimension first
        if in_hw == out_hw and not any(pad[:4]):
            return None
        return LayerEvent(in_hw, out_hw, (1, 1), (1, 1), (int(pad[2]), int(pad[0])), (1, 1), kind="pad")
    return None


class GeometryWarning(UserWarning):
    """A layer's receptive-field geometry could not be measured; the centre may be wrong."""


def module_event(module: nn.Module, x, output) -> LayerEvent:
    """A convolution or pool module's event from its attributes (for a forward that ran no convolution operator).

    Warns (:class:`GeometryWarning`) when the attributes do not explain the module's output size: its forward
    then does something else (a padding or resampling decided at run time) that the attributes do not describe.
    """
    kernel = as_pair(module.kernel_size)
    dilation = as_pair(getattr(module, "dilation", 1))
    padding = module.padding
    if isinstance(padding, str):  # "same" (odd kernels: centred) / "valid"
        padding = tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation)) if padding == "same" else (0, 0)
    padding = as_pair(padding)
    stride = as_pair(module.stride if module.stride is not None else kernel)
    event = LayerEvent(tuple(x.shape[-2:]), tuple(output.shape[-2:]), kernel, stride, padding, dilation,
                       transposed=isinstance(module, nn.ConvTranspose2d))
    ceil = bool(getattr(module, "ceil_mode", False))
    for n, out, k, s, p, d in zip(event.in_hw, event.out_hw, kernel, stride, padding, dilation):
        span = n + 2 * p - d * (k - 1) - 1
        expected = (n - 1) * s - 2 * p + d * (k - 1) + 1 if event.transposed else \
            (-(-span // s) if ceil else span // s) + 1
        if not (out == expected or (event.transposed and expected <= out < expected + s)):
            warnings.warn(
                f"{type(module).__name__} maps a {event.in_hw} input to {event.out_hw}, which its kernel, stride, "
                f"padding and dilation do not explain, and ran no convolution or pool operator that could be "
                "measured: its receptive-field centre is unknown and the reported one may be wrong",
                GeometryWarning, stacklevel=3)
            break
    return event


class _OperatorRecorder(TorchDispatchMode):
    def __init__(self, log: LayerLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        event = operator_event(func, args, kwargs, output)
        if event is not None:
            self.log.events.append(event)
        return output


class LayerLog:
    """Records the spatial layers a forward pass runs, with markers for when each target was produced.

    Recording starts at construction and ends at :meth:`close` (or the ``with`` block). Other dispatch modes
    entered while it records must be left before it closes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.events: list[LayerEvent] = []
        self.marks: dict[str, int] = {}
        self._starts: dict[int, list[int]] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, _SPATIAL_TYPES):
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave))
        self._mode = _OperatorRecorder(self)
        self._mode.__enter__()
        self._open = True

    def _enter(self, module: nn.Module, args) -> None:
        self._starts.setdefault(id(module), []).append(len(self.events))

    def _leave(self, module: nn.Module, args, output) -> None:
        starts = self._starts.get(id(module))
        if not starts:
            return
        start = starts.pop()
        if not args or not hasattr(args[0], "dim") or args[0].dim() != 4 or not hasattr(output, "dim") \
                or output.dim() != 4:
            return
        if any(e.kind != "pad" for e in self.events[start:]):
            return  # measured: the operators this module ran
        # no convolution or pool operator ran (an FFT-computed convolution): what it computes is its attributes
        del self.events[start:]
        self.events.append(module_event(module, args[0], output))

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, len(self.events))

    def close(self) -> None:
        if self._open:
            self._open = False
            self._mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main_path(events: list[LayerEvent], input_hw: tuple[int, int], axis: int) -> Iterator[tuple[LayerEvent, int]]:
    """The convolutions and pools of the main path along ``axis`` (0: rows, 1: columns), each with the explicit
    padding before it that it consumes (0 if none)."""
    current = input_hw[axis]
    pending: tuple[int, int] | None = None  # (padding before, padded size) not yet consumed by a layer
    for event in events:
        size_in = event.in_hw[axis]
        if event.kind == "pad":
            if size_in == current:
                pending = (event.padding[axis], event.out_hw[axis])
            elif pending is not None and size_in == pending[1]:  # padding a padded map
                pending = (pending[0] + event.padding[axis], event.out_hw[axis])
            continue
        if pending is not None and size_in == pending[1] and size_in != current:
            explicit = pending[0]
        elif size_in == current:
            explicit = 0
        else:  # a parallel branch from a resolution the path has left
            continue
        pending = None
        current = event.out_hw[axis]
        yield event, explicit


def path_geometry(
    events: list[LayerEvent], input_hw: tuple[int, int], feature_hw: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(c0, S) per axis (row, column) of the main path from the input to a feature map of size ``feature_hw``."""
    offsets, strides = [], []
    for axis in (0, 1):
        offset, stride = 0.0, 1.0
        for event, explicit in main_path(events, input_hw, axis):
            k, s, p, d = event.kernel[axis], event.stride[axis], event.padding[axis], event.dilation[axis]
            offset -= explicit * stride
            if event.transposed:  # output o gathers input (o + p − d(k−1)/2)/s
                if any(min(t) + max(t) != k - 1 for t in (range(r, k, s) for r in range(min(s, k)))):
                    warnings.warn(
                        f"a transposed convolution (kernel {k}, stride {s}) centres its output units on "
                        "alternating phases: the receptive-field centre is their average, off by up to "
                        f"{d * (s - 1) / 2 / s * stride:g} px for single units", GeometryWarning, stacklevel=2)
                offset += (p - d * (k - 1) / 2) / s * stride
                stride /= s
            else:
                offset += (-p + d * (k - 1) / 2) * stride
                stride *= s
        observed = input_hw[axis] / feature_hw[axis]
        if round(observed / stride) > 1:  # downsampling by layers that are not convolutions or pools
            factor = observed / stride
            offset += (factor - 1) / 2 * stride
            stride = observed
        offsets.append(offset)
        strides.append(stride)
    return (offsets[0], offsets[1]), (strides[0], strides[1])


def path_extent(events: list[LayerEvent], input_hw: tuple[int, int]) -> tuple[int, int]:
    """Theoretical receptive-field size (rows, columns) of one unit at the end of the main path through ``events``:
    1 + Σ_l d_l(k_l−1)·Π_{m<l} s_m (a transposed layer divides the step by its stride)."""
    sizes = []
    for axis in (0, 1):
        extent, stride = 1.0, 1.0
        for event, _ in main_path(events, input_hw, axis):
            k, s, d = event.kernel[axis], event.stride[axis], event.dilation[axis]
            extent += d * (k - 1) * (stride / s if event.transposed else stride)
            stride = stride / s if event.transposed else stride * s
        sizes.append(math.ceil(extent))
    return sizes[0], sizes[1]


def path_period(events: list[LayerEvent], input_hw: tuple[int, int]) -> tuple[int, int]:
    """The largest total downsampling reached along the main path, per axis: input sizes that differ by a multiple
    of it give every layer the same size modulo its stride, hence the same run-time ("same") paddings."""
    periods = []
    for axis in (0, 1):
        stride, largest = 1.0, 1.0
        for event, _ in main_path(events, input_hw, axis):
            stride = stride / event.stride[axis] if event.transposed else stride * event.stride[axis]
            largest = max(largest, stride)
        periods.append(math.ceil(largest))
    return periods[0], periods[1]


def unit_centre(
    unit: tuple[int, int], offsets: tuple[float, float], strides: tuple[float, float]
) -> tuple[float, float]:
    """Input-pixel (row, column) centre of output unit ``unit``: c0 + i·S."""
    return offsets[0] + unit[0] * strides[0], offsets[1] + unit[1] * strides[1]
