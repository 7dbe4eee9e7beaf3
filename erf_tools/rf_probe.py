"""An empirical check of the receptive-field geometry: the input-gradient support of a linearised copy.

In a copy of the network whose convolution and linear weights are all positive, whose biases are zero, whose
activations are the identity and whose normalisations are positive scalings, the input gradient of one output
unit is a sum over paths of products of positive numbers: nothing cancels, so its support is exactly the
theoretical receptive field (Luo et al. 2016, §2) — the input pixels connected to the unit — whatever the padding
rules (PyTorch symmetric, TensorFlow "same", explicit ``F.pad``). A layer of kernel k, stride s, leading padding p
and dilation d maps unit i to the input interval [i·s − p, i·s − p + d(k−1)], whose *midpoint* is
i·s − p + d(k−1)/2; composing layers keeps intervals, so the midpoint of the support's bounding box is the
analytic centre c0 + i·S exactly, provided the support does not reach the input border (zero padding would clip
it). The *centroid* is not exact: it is weighted by the number of paths and the kernel weights, which are not
symmetric under asymmetric padding or random weights.

What the copy changes, and why:

* convolution / linear weights ← positive, each output an average of its inputs (float64 keeps the smallest path
  products, ~(1/k)^depth, far above underflow); biases ← 0; other parameters (layer scales, norm affines,
  position embeddings) ← 1;
* activations and batch norms ← identity (no zero derivative; sigmoid-like gates stay, bounded and strictly
  increasing); layer, group, instance and RMS norms ← division
  by their detached mean magnitude: positive, no channel-mean subtraction that would cancel, no gradient through
  spatial statistics, and bounded activations where branches multiply;
* global context ← detached: spatial statistics (squeeze-and-excitation means, global pooling, the norms of
  global response normalisation) do not carry gradient, so a gate multiplies by a constant instead of widening
  the support to the whole image;
* ``F.scaled_dot_product_attention`` ← its value input, and a softmax over the last axis of a square (…, N, N)
  tensor (explicit attention weights) ← the identity matrix: each token attends to itself, so the local skeleton
  of a transformer (patch embedding, merges, MLPs) stays and its global token mixing goes;
* max pools ← average pools over the same windows (the max passes the gradient to one tap), their −inf padding
  ← zeros;
* deformable sampling offsets (parameters of modules named ``*offset*``) ← 0: the regular sampling grid.

Any other global operator left in the copy (a non-square attention, a spatial statistic not taken by a mean) spreads the
support over the whole input, which :func:`probe_receptive_field` reports as an error rather than a centre.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from erf_tools.receptive_field import LayerLog, path_extent, path_geometry, path_period, unit_centre
from erf_tools.targets import FeatureCapture, centre_unit, resolve_targets, to_nchw


class ProbeError(ValueError):
    """The probe cannot measure the receptive field (it reaches the input border, or no gradient reaches the input)."""


@dataclass(frozen=True)
class ProbedField:
    """Support of a unit's input gradient in the linearised copy: bounding box (inclusive pixel rows/columns)."""

    target: str
    input_hw: tuple[int, int]
    feature_hw: tuple[int, int]
    unit: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def centre(self) -> tuple[float, float]:
        """Midpoint of the bounding box (row, column): the exact receptive-field centre."""
        return (self.rows[0] + self.rows[1]) / 2, (self.cols[0] + self.cols[1]) / 2

    @property
    def size(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0] + 1, self.cols[1] - self.cols[0] + 1


@dataclass(frozen=True)
class Geometry:
    """Receptive-field geometry of a target: unit i is centred at ``offset + i·stride`` (per axis, row/column)."""

    target: str
    input_hw: tuple[int, int]
    feature_hw: tuple[int, int]
    unit: tuple[int, int]
    offset: tuple[float, float]
    stride: tuple[float, float]
    extent: tuple[int, int] | None = None  # theoretical receptive-field size, when known
    period: tuple[int, int] | None = None  # input-size period of the paddings (see path_period), when known

    @property
    def centre(self) -> tuple[float, float]:
        return unit_centre(self.unit, self.offset, self.stride)


# Sigmoid-like gates stay: bounded, with a positive derivative (and on detached context, constants); made the
# identity, a squeeze-excitation gate would square the activations at every block until they overflow.
_IDENTITY = {F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.gelu, F.silu, F.mish, F.hardswish, F.leaky_relu,
             F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu, F.softplus, F.glu, torch.relu, torch.relu_, torch.selu,
             torch.Tensor.relu, torch.Tensor.relu_, F.batch_norm, F.local_response_norm}
_NORMS = {F.layer_norm: "last", F.group_norm: "sample", F.instance_norm: "sample"}
if hasattr(F, "rms_norm"):
    _NORMS[F.rms_norm] = "last"


def _detached_scale_norm(func, args, kwargs) -> torch.Tensor:
    """A normalisation as a division by its magnitude *detached* (mean |x| over the normalised axes): no mean
    subtraction that could cancel, no gradient through the statistic (which would spread the support), and
    activations that stay bounded through products of branches (Conv2Former's modulation would overflow)."""
    x = args[0] if args else kwargs["input"]
    if _NORMS[func] == "last":
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        dims = tuple(range(x.dim() - len((shape,) if isinstance(shape, int) else shape), x.dim()))
    else:
        dims = tuple(range(1, x.dim()))
    return x / x.detach().abs().mean(dims, keepdim=True).clamp_min(1e-30)
#: spatial statistics (function: position of its ``dim`` argument): squeeze-excitation means, GRN norms, ...
_REDUCTIONS = {torch.mean: 1, torch.sum: 1, torch.amax: 1, torch.var: 1, torch.std: 1, torch.Tensor.mean: 1,
               torch.Tensor.sum: 1, torch.Tensor.amax: 1, torch.Tensor.var: 1, torch.Tensor.std: 1, torch.norm: 2,
               torch.Tensor.norm: 2, torch.linalg.vector_norm: 2, torch.linalg.norm: 2}
_GLOBAL_POOLS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_MAX_POOLS = {F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d}


def _pool_arguments(args, kwargs) -> tuple:
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v) * (2 if len(tuple(v)) == 1 else 1)  # noqa: E731
    kernel = pair(values["kernel_size"])
    stride = values.get("stride") or kernel
    return (values["input"], kernel, pair(stride), pair(values.get("padding", 0)), pair(values.get("dilation", 1)),
            bool(values.get("ceil_mode", False)))


def _averaging_pool(func, args, kwargs) -> torch.Tensor:
    """A max pool as the average over the same window (zero padding, dilation and ceil mode kept): the max sends
    the gradient to one tap only, the average to all of them."""
    x, kernel, stride, padding, dilation, ceil_mode = _pool_arguments(args, kwargs)
    with torch.no_grad():
        size = func(*args, **kwargs)
        size = (size[0] if isinstance(size, tuple) else size).shape[-2:]
    channels = x.shape[1]
    weight = x.new_full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]))
    # extra trailing zeros where ceil_mode lets the last window hang over the end
    extra = [max(0, (n - 1) * s + d * (k - 1) + 1 - (size_in + 2 * p)) for n, s, d, k, size_in, p in
             zip(size, stride, dilation, kernel, x.shape[-2:], padding)]
    padded = F.pad(x, (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]))
    out = F.conv2d(padded, weight, stride=stride, dilation=dilation, groups=channels)
    return out[..., :size[0], :size[1]]


def _reduces_space(func, args, kwargs) -> bool:
    x = args[0] if args else (kwargs or {}).get("input")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    position = _REDUCTIONS[func]
    dims = args[position] if len(args) > position else (kwargs or {}).get("dim")
    if dims is None:
        return True
    dims = {d % 4 for d in ((dims,) if isinstance(dims, int) else dims)}
    return len(dims & {1, 2, 3}) >= 2  # over both spatial axes (NCHW 2,3 / NHWC 1,2), not over channels only


class Linearised(TorchFunctionMode):
    """Runs a forward as the linearised copy described in the module docstring (activations, norms: identity;
    global context: detached; attention: identity token mixing)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IDENTITY:
            return args[0] if args else kwargs["input"]
        if func in _NORMS:
            return _detached_scale_norm(func, args, kwargs)
        if func is F.scaled_dot_product_attention:
            return args[2] if len(args) > 2 else kwargs["value"]
        if func in _SOFTMAX:
            x = args[0] if args else kwargs["input"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if x.dim() >= 3 and x.shape[-1] == x.shape[-2] and dim in (-1, x.dim() - 1):
                # attention weights softmax(q kᵀ): each token attends to itself only
                return torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand(x.shape)
        if func in _MAX_POOLS:
            return _averaging_pool(func, args, kwargs)
        if func is F.pad and not math.isfinite(float(args[3] if len(args) > 3 else kwargs.get("value") or 0.0)):
            # a max pool's −inf padding (timm MaxPool2dSame), which the averaging pool must read as zeros
            return F.pad(args[0], args[1] if len(args) > 1 else kwargs["pad"])
        result = func(*args, **kwargs)
        if (func in _REDUCTIONS and _reduces_space(func, args, kwargs)) or (
                func in _GLOBAL_POOLS and isinstance(result, torch.Tensor) and result.shape[-2:] == (1, 1)):
            return result.detach()
        return result


def linearised_copy(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A deep copy of ``model`` in eval mode with the parameters of the module docstring (run it under
    :class:`Linearised`)."""
    twin = copy.deepcopy(model).eval().to(dtype)
    with torch.no_grad():
        for module_name, module in twin.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if "offset" in module_name.rsplit(".", 1)[-1] or name == "bias" or name.endswith("_bias"):
                    param.zero_()
                elif param.dim() >= 2 and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    param.fill_(1.0 / param[0].numel())
                elif param.dim() >= 2 and name == "weight":  # a weight used functionally (e.g. ParC's kernel)
                    param.fill_(1.0 / param[0].numel())
                else:
                    param.fill_(1.0)
    return twin


def probe_receptive_field(
    model: nn.Module,
    input_size: int | tuple[int, int],
    target: str | None = None,
    unit: tuple[int, int] | None = None,
    centre: str = "half",
    axes: tuple[int, ...] = (0, 1),
) -> ProbedField:
    """The input-gradient support of unit ``unit`` (default: the engine's centre unit under ``centre``) of
    ``target`` in the linearised, all-positive copy of ``model`` on an all-ones input of ``input_size``.

    Raises :class:`ProbeError` when the support touches the input border along one of ``axes`` (0: rows,
    1: columns; use a larger input: the border clips the receptive field and moves the midpoint) or when no gradient
    reaches the input.
    """
    return probe_receptive_fields(model, input_size, target, [unit], centre, axes)[0]


def probe_receptive_fields(
    model: nn.Module,
    input_size: int | tuple[int, int],
    target: str | None = None,
    units: list[tuple[int, int] | None] = (None,),
    centre: str = "half",
    axes: tuple[int, ...] = (0, 1),
) -> list[ProbedField]:
    """:func:`probe_receptive_field` for several units from one forward pass (``None``: the centre unit)."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    (resolved,) = resolve_targets(model, target)
    twin = linearised_copy(model)
    x = torch.ones(1, getattr(model, "in_chans", 3), height, width, dtype=torch.float64, requires_grad=True)
    with FeatureCapture(twin, [resolved]) as capture, Linearised(), torch.enable_grad():
        output = capture.run(x)[resolved.module_name]
    grid = to_nchw(output, twin, (height, width), resolved.layout, resolved.name)
    feature_hw = tuple(int(v) for v in grid.shape[-2:])
    fields = []
    for index, unit in enumerate(units):
        unit = centre_unit(centre, *feature_hw) if unit is None else centre_unit(tuple(unit), *feature_hw)
        objective = grid[0, :, unit[0], unit[1]].sum()
        if not objective.requires_grad:
            raise ProbeError(f"target {resolved.name!r} does not depend on the input in the linearised copy")
        (gradient,) = torch.autograd.grad(objective, x, retain_graph=index < len(units) - 1)
        if not bool(torch.isfinite(gradient).all()):
            raise ProbeError(f"non-finite input gradient from unit {unit} of {resolved.name!r} in the linearised "
                             f"copy (largest activation {float(grid.detach().abs().max()):.3g})")
        support = gradient[0].abs().sum(0) > 0
        rows, cols = torch.nonzero(support.any(1)).flatten(), torch.nonzero(support.any(0)).flatten()
        if rows.numel() == 0:
            raise ProbeError(f"no input gradient reaches the input from unit {unit} of {resolved.name!r}")
        box_rows, box_cols = (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))
        touches = [box[0] == 0 or box[1] == size - 1 for box, size in ((box_rows, height), (box_cols, width))]
        if any(touches[axis] for axis in axes):
            raise ProbeError(
                f"the receptive field of unit {unit} of {resolved.name!r} reaches the border of the "
                f"{height}×{width} input (rows {box_rows}, columns {box_cols}): use a larger input, or the model "
                "keeps a global operator (explicit attention, a spatial statistic) that the linearised copy does "
                "not remove"
            )
        fields.append(ProbedField(resolved.name, (height, width), feature_hw, unit, box_rows, box_cols))
    return fields


def receptive_field_geometry(
    model: nn.Module, input_size: int | tuple[int, int], target: str | None = None, centre: str = "half"
) -> Geometry:
    """The engine's analytic geometry of ``target`` at ``input_size`` (one no-grad forward on zeros, the layers
    recorded by :class:`~erf_tools.receptive_field.LayerLog`), with the centre unit under ``centre``."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    (resolved,) = resolve_targets(model, target)
    was_training = model.training
    model.eval()
    parameter = next(model.parameters(), None)
    x = torch.zeros(1, getattr(model, "in_chans", 3), height, width,
                    dtype=parameter.dtype if parameter is not None else torch.float32,
                    device=parameter.device if parameter is not None else None)
    try:
        with FeatureCapture(model, [resolved]) as capture, torch.no_grad():
            with LayerLog(model) as log:
                capture.on_capture = log.mark
                output = capture.run(x)[resolved.module_name]
    finally:
        model.train(was_training)
    grid = to_nchw(output, model, (height, width), resolved.layout, resolved.name)
    feature_hw = tuple(int(v) for v in grid.shape[-2:])
    events = log.events[: log.marks.get(resolved.module_name, len(log.events))]
    offset, stride = path_geometry(events, (height, width), feature_hw)
    return Geometry(resolved.name, (height, width), feature_hw, centre_unit(centre, *feature_hw), offset, stride,
                    path_extent(events, (height, width)), path_period(events, (height, width)))


def probe_geometry(
    model: nn.Module,
    input_size: int | tuple[int, int],
    target: str | None = None,
    centre: str = "half",
    max_size: int = 4096,
) -> Geometry:
    """The geometry at ``input_size`` measured by the probe alone, one axis at a time: the support midpoints of two
    neighbouring units give the stride S and the offset c0, on an input lengthened along that axis by whole
    multiples of the padding period P (the largest total downsampling on the path) until the receptive field fits
    (first guess: the theoretical extent plus two periods) and shortened along the other by whole multiples of its
    period (the axes are independent: convolutions, pools and paddings act on each separately).

    Changing the size by multiples of P keeps every layer's input size modulo its stride, hence every padding
    decision ("same" padding depends on it) and c0. Only for models that accept any input size; for the
    others (ViT, Swin at their ``img_size``) call :func:`probe_receptive_field` at the model's size.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    base = receptive_field_geometry(model, size, target, centre)
    offset, stride = [0.0, 0.0], [0.0, 0.0]
    for axis in (0, 1):
        step = base.period[axis]
        grow = max(0, math.ceil((base.extent[axis] + 2 * step - size[axis]) / step))
        other, other_step = 1 - axis, base.period[1 - axis]
        retries = 0
        while True:
            probe_size = list(size)
            probe_size[axis] += grow * step
            # the other axis as short as its size modulo the period allows (same paddings there, less work)
            removed = max(0, (size[other] - max(4 * other_step, 32)) // other_step)
            probe_size[other] = size[other] - removed * other_step
            if probe_size[axis] > max_size:
                raise ProbeError(
                    f"the receptive field of {base.target!r} does not fit in {max_size} pixels (theoretical size "
                    f"{base.extent[axis]}): the support keeps reaching the border, so the model has an operator "
                    "with a global field (e.g. a circular convolution along a whole axis); probe an earlier target")
            feature = receptive_field_geometry(model, tuple(probe_size), target, centre)
            unit = list(feature.unit)
            neighbour = list(unit)
            neighbour[axis] += 1 if unit[axis] + 1 < feature.feature_hw[axis] else -1
            try:
                first, second = probe_receptive_fields(model, tuple(probe_size), target,
                                                       [tuple(unit), tuple(neighbour)], axes=(axis,))
                break
            except ProbeError as exc:
                retries += 1
                if "border" not in str(exc) or retries > 2:  # twice the theoretical field: a global operator
                    raise
                grow = max(1, grow * 2)
        stride[axis] = (second.centre[axis] - first.centre[axis]) / (second.unit[axis] - first.unit[axis])
        offset[axis] = first.centre[axis] - first.unit[axis] * stride[axis]
    return Geometry(base.target, base.input_hw, base.feature_hw, base.unit, (offset[0], offset[1]),
                    (stride[0], stride[1]))
