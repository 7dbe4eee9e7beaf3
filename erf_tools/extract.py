"""The extraction engine: images -> model + target layers -> ERF maps.

One forward pass per batch captures every target; one backward per target (the graph is kept between them) gives
the per-sample input gradients, because in eval mode sample b's features depend on x_b alone, so
∂(Σ_b s_b)/∂x_b = ∂s_b/∂x_b exactly. The protocol's per-sample post-processing (ReLU/abs/clamp, RGB reduction)
happens before anything is summed over images, and each sample is checked for NaN/Inf on its own. No parameter
gradients are computed. Accumulators are exact (:class:`ExactSum`), so neither the batch grouping, nor a resume, nor
splitting the images over processes changes the sum of the same per-image maps.

Performance (issue 8, measured in ``bench/RESULTS.md`` with ``bench/bench_erf.py``): the forward stops after the
last target; batches amortise per-call overheads; ``channels_last`` gives oneDNN/cuDNN their fast NHWC kernels (and
makes large depthwise convs on CPU several times faster); ``fold_bn`` removes the memory-bound BatchNorm passes;
``reparameterize`` merges RepLKNet's parallel kernels; ``fft_depthwise`` computes very large depthwise kernels by
FFT (``fast=True`` turns on all of these); ``precision="bf16"`` autocasts (the stem and the stages at stride ≤ 8
stay float32). These act on a private copy of the model (:func:`prepare_model`) and change the maps by float
rounding only, except reduced precision. ``batch_size="auto"`` sizes batches from a meta-device replay of one batch
(:mod:`erf_tools.memory`); images are preprocessed in a background thread on accelerators;
:mod:`erf_tools.distributed` spreads the images over processes.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import math
import platform
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from erf_tools.images import ImageSource, Preprocessing, iter_inputs, open_image_source, preprocessing_for
from erf_tools.protocols import ERFOptions, resolve_options
from erf_tools.receptive_field import LayerLog, path_geometry, unit_centre
from erf_tools.results import ERFResult, atomic_write_bytes
from erf_tools.targets import FeatureCapture, Target, centre_unit, feature_reductions, resolve_targets, to_nchw
from erf_tools.weights import WeightsInfo, find_silenced_branches, load_model, warn_if_silenced

PRECISIONS = ("fp32", "bf16", "fp16")
#: under reduced precision, the stem and the stages up to this total stride run in float32 (accuracy of the maps)
FP32_MAX_STRIDE = 8


def centre_objective(features: torch.Tensor, unit: tuple[int, int], options: ERFOptions) -> torch.Tensor:
    """The scalar whose input gradient is the ERF: Σ_b reduce_c(act(F[b, c, i, j])) over the selected channels."""
    centre = features[:, :, unit[0], unit[1]].float()
    if options.channels is not None:
        centre = centre[:, list(options.channels)]
    if options.activation == "relu":
        centre = torch.relu(centre)
    per_sample = centre.sum(dim=1) if options.channel_reduction == "sum" else centre.mean(dim=1)
    return per_sample.sum()


def _apply_sign(gradient: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "relu":
        return torch.relu(gradient)
    if rule == "abs":
        return gradient.abs()
    return gradient


def per_sample_maps(input_gradient: torch.Tensor, options: ERFOptions) -> torch.Tensor:
    """B×3×H×W input gradients -> B×H×W maps, with the sign rule applied per sample (before any image sum)."""
    reduce = torch.sum if options.rgb_reduction == "sum" else torch.mean
    if options.sign_before_rgb:
        return reduce(_apply_sign(input_gradient, options.gradient), dim=1)
    return _apply_sign(reduce(input_gradient, dim=1), options.gradient)


def block_sum(maps: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor``×``factor`` blocks of n×H×W maps (zero-padded to a multiple): per-image maps for the bootstrap."""
    if factor == 1:
        return maps
    n, height, width = maps.shape
    pad_h, pad_w = -height % factor, -width % factor
    if pad_h or pad_w:
        maps = np.pad(maps, ((0, 0), (0, pad_h), (0, pad_w)))
    h, w = maps.shape[1] // factor, maps.shape[2] // factor
    return maps.reshape(n, h, factor, w, factor).sum(axis=(2, 4))


#: Exponent grid of :class:`ExactSum`: bucket j holds multiples of 2**(_LOWEST_EXPONENT + _BUCKET_BITS * j).
_BUCKET_BITS = 30
_LOWEST_EXPONENT = -150  # below float32's smallest subnormal, 2**-149
_NUM_BUCKETS = 10  # the top bucket, 2**120, covers float32's largest value (< 2**128)
#: Additions one bucket can take and stay exact: 30-bit parts in a 53-bit float64 mantissa.
MAX_EXACT_ADDITIONS = 2 ** (53 - _BUCKET_BITS)


class ExactSum:
    """The exact sum of float32 maps, whatever the order or grouping of the additions.

    Why: a float64 running sum rounds differently when the same maps arrive in another order, so a run split over
    processes (:mod:`erf_tools.distributed`), a resumed run or a different batch grouping would differ in the last
    bits from a single uninterrupted run. Here every value is cut along a fixed exponent grid into parts that are
    multiples of 2**e_j and smaller than 2**(e_j + 30); each bucket j sums only such parts, which float64 does
    exactly for up to 2**23 maps. Buckets therefore hold exact integers (times 2**e_j), any order of additions and
    merges gives the same buckets, and :meth:`value` (buckets added from the smallest up) is a deterministic
    function of the exact sum. Inputs of more than 24 significant bits (float64) keep their bits down to 2**-150.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.buckets: dict[int, torch.Tensor] = {}
        self.additions = 0

    def _bucket_add(self, index: int, values: torch.Tensor) -> None:
        if index in self.buckets:
            self.buckets[index] += values.to(self.buckets[index].device)
        else:
            self.buckets[index] = values.clone()

    def add(self, maps: torch.Tensor) -> None:
        """Add Σ_n maps[n] for an n×H×W tensor (any device; the buckets stay on the device of the first add)."""
        count = int(maps.shape[0])
        if count == 0:
            return
        if self.additions + count > MAX_EXACT_ADDITIONS:
            raise OverflowError(f"ExactSum is exact for at most {MAX_EXACT_ADDITIONS} maps")
        rest = maps.detach().to(torch.float64)
        self.additions += count
        peak = float(rest.abs().max())
        if peak == 0.0:
            return
        if not math.isfinite(peak):
            raise ValueError("ExactSum takes finite values only (filter NaN/Inf first)")
        top_exponent = math.frexp(peak)[1] - 1  # peak lies in [2**top, 2**(top+1))
        index = min((top_exponent - _LOWEST_EXPONENT) // _BUCKET_BITS, _NUM_BUCKETS - 1)
        while index > 0:
            scale = 2.0 ** (_LOWEST_EXPONENT + _BUCKET_BITS * index)
            part = torch.trunc(rest / scale) * scale  # exact: power-of-two scaling and truncation
            self._bucket_add(index, part.sum(dim=0))
            rest = rest - part  # exact: |rest| < scale from here on
            index -= 1
            if not bool(rest.any()):
                return
        self._bucket_add(0, rest.sum(dim=0))

    def merge(self, other: ExactSum) -> None:
        if other.shape != self.shape:
            raise ValueError(f"cannot merge sums of shape {other.shape} into {self.shape}")
        if self.additions + other.additions > MAX_EXACT_ADDITIONS:
            raise OverflowError(f"ExactSum is exact for at most {MAX_EXACT_ADDITIONS} maps")
        for index, values in other.buckets.items():
            self._bucket_add(index, values)
        self.additions += other.additions

    def value(self) -> np.ndarray:
        """The sum as float64 (buckets added in a fixed order, so equal buckets give bit-identical values)."""
        total = np.zeros(self.shape, dtype=np.float64)
        for index in sorted(self.buckets):
            total += self.buckets[index].detach().to("cpu", torch.float64).numpy()
        return total

    def state(self) -> dict[str, np.ndarray]:
        indices = sorted(self.buckets)
        stacked = (np.stack([self.buckets[i].detach().cpu().numpy() for i in indices]) if indices
                   else np.zeros((0, *self.shape), dtype=np.float64))
        return {"bucket_index": np.array(indices, dtype=np.int64), "buckets": stacked,
                "additions": np.array(self.additions, dtype=np.int64)}

    @classmethod
    def from_state(cls, shape: Sequence[int], state: dict[str, np.ndarray]) -> ExactSum:
        result = cls(shape)
        for index, values in zip(state["bucket_index"].tolist(), state["buckets"]):
            result.buckets[int(index)] = torch.from_numpy(np.array(values, dtype=np.float64))
        result.additions = int(state["additions"])
        return result


def _block_sum_torch(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """:func:`block_sum` on the maps' device, in float64."""
    maps = maps.to(torch.float64)
    if factor == 1:
        return maps
    n, height, width = maps.shape
    pad_h, pad_w = -height % factor, -width % factor
    if pad_h or pad_w:
        maps = torch.nn.functional.pad(maps, (0, pad_w, 0, pad_h))
    h, w = maps.shape[1] // factor, maps.shape[2] // factor
    return maps.reshape(n, h, factor, w, factor).sum(dim=(2, 4))


@dataclass
class ERFAccumulator:
    """Exact running sum (:class:`ExactSum`) of valid per-image maps of one target, with the bookkeeping a result
    needs. ``total`` is the float64 value of the sum."""

    shape: tuple[int, int]
    per_image_downsample: int = 1
    keep_per_image: bool = True
    count: int = 0
    image_ids: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    per_image: list[np.ndarray] = field(default_factory=list)
    #: images seen (valid or not), and the position in that sequence of each valid / rejected image: lets the
    #: shards of a distributed run be put back in the order a single process would have seen the images
    processed: int = 0
    positions: list[int] = field(default_factory=list)
    rejected_positions: list[int] = field(default_factory=list)
    sums: ExactSum = field(init=False)

    def __post_init__(self) -> None:
        self.sums = ExactSum(self.shape)

    @property
    def total(self) -> np.ndarray:
        return self.sums.value()

    @total.setter
    def total(self, value: np.ndarray) -> None:
        self.sums = ExactSum(self.shape)
        self.sums.add(torch.as_tensor(np.asarray(value, dtype=np.float64))[None])

    def add(self, maps: torch.Tensor, ids: Sequence[str]) -> None:
        """Add a batch of per-image maps; images with any NaN/Inf are counted as rejected, not added."""
        maps = maps.detach()
        finite = torch.isfinite(maps).reshape(len(ids), -1).all(dim=1)
        flags = finite.cpu().tolist()
        for offset, (image_id, ok) in enumerate(zip(ids, flags)):
            (self.image_ids if ok else self.rejected).append(image_id)
            (self.positions if ok else self.rejected_positions).append(self.processed + offset)
        self.processed += len(ids)
        valid = maps if all(flags) else maps[finite]
        self.count += int(sum(flags))
        self.sums.add(valid)
        if self.keep_per_image and len(valid):
            self.per_image.append(
                _block_sum_torch(valid, self.per_image_downsample).to("cpu", torch.float32).numpy())

    def merge(self, other: ERFAccumulator) -> None:
        """Fold another accumulator of the same target in (shards of a distributed run, resumed runs): exact."""
        self.sums.merge(other.sums)
        self.count += other.count
        self.image_ids += other.image_ids
        self.rejected += other.rejected
        self.per_image += other.per_image
        self.positions += [self.processed + p for p in other.positions]
        self.rejected_positions += [self.processed + p for p in other.rejected_positions]
        self.processed += other.processed

    def finalize(self, options: ERFOptions) -> np.ndarray:
        """The protocol's map: mean or sum over valid images, then the normalisation."""
        result = self.total
        if options.image_reduction == "mean" and self.count:
            result /= self.count
        if options.normalisation == "sum":
            total = result.sum()
            result = result / total if total > 0 else np.zeros_like(result)
        elif options.normalisation == "max":
            peak = result.max()
            result = result / peak if peak > 0 else np.zeros_like(result)
        return result

    def per_image_array(self) -> np.ndarray | None:
        if not self.keep_per_image:
            return None
        if not self.per_image:
            h, w = block_sum(np.zeros((1, *self.shape)), self.per_image_downsample).shape[1:]
            return np.zeros((0, h, w), dtype=np.float32)
        return np.concatenate(self.per_image, axis=0)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint the accumulator (see :func:`save_partial`); the exact sum is kept bucket by bucket,
        so a resumed run ends with the same bits as an uninterrupted one."""
        per_image = self.per_image_array()
        return {
            "total": self.total,
            "count": np.array(self.count),
            "image_ids": np.array(self.image_ids, dtype=str),
            "rejected": np.array(self.rejected, dtype=str),
            "per_image": per_image if per_image is not None else np.zeros((0, 0, 0), np.float32),
            "processed": np.array(self.processed),
            "positions": np.array(self.positions, dtype=np.int64),
            "rejected_positions": np.array(self.rejected_positions, dtype=np.int64),
        } | {f"sum.{k}": v for k, v in self.sums.state().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "sum.buckets" in state:
            self.sums = ExactSum.from_state(self.shape, {k[4:]: v for k, v in state.items() if k.startswith("sum.")})
        else:  # a checkpoint written before the exact sum: its float64 total
            self.total = state["total"]
        self.count = int(state["count"])
        self.image_ids = [str(s) for s in state["image_ids"]]
        self.rejected = [str(s) for s in state["rejected"]]
        per_image = state["per_image"]
        self.per_image = [per_image] if self.keep_per_image and per_image.size else []
        if "positions" in state:
            self.processed = int(state["processed"])
            self.positions = [int(p) for p in state["positions"]]
            self.rejected_positions = [int(p) for p in state["rejected_positions"]]
        else:  # older checkpoint: order of valid and rejected images unknown, valid ones first
            self.processed = self.count + len(self.rejected)
            self.positions = list(range(self.count))
            self.rejected_positions = list(range(self.count, self.processed))


@dataclass
class _TargetGeometry:
    target: Target
    feature_shape: tuple[int, int, int]
    unit: tuple[int, int]
    rf_centre: tuple[float, float] | None
    stride: tuple[float, float]


def _versions() -> dict[str, str]:
    import timm

    import erf_tools

    return {"erf_tools": erf_tools.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


@contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode without parameter gradients for the duration; the caller's state is restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _batches(stream: Iterator[tuple[str, torch.Tensor]], batch_size: int) -> Iterator[tuple[list, torch.Tensor]]:
    ids, tensors = [], []
    for image_id, tensor in stream:
        ids.append(image_id)
        tensors.append(tensor() if callable(tensor) else tensor)  # lazily preprocessed items (see _input_stream)
        if len(ids) == batch_size:
            yield ids, torch.stack(tensors)
            ids, tensors = [], []
    if ids:
        yield ids, torch.stack(tensors)


_END = object()


class _Prefetcher:
    """Decodes and preprocesses the next batches in a background thread while the device computes.

    Why: on a GPU the ERF pass of a batch takes milliseconds, less than decoding and bicubically resizing its
    images to 1024×1024 on one CPU core, so without overlap the accelerator waits on PIL. PIL and torch release
    the GIL for that work. On CUDA the batches are also pinned, so the copy to the device can be asynchronous.
    """

    def __init__(self, batches: Iterator, depth: int = 2, pin_memory: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin_memory
        self._thread = threading.Thread(target=self._run, args=(batches,), daemon=True, name="erf-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, batches: Iterator) -> None:
        try:
            for ids, batch in batches:
                if self._pin:
                    batch = batch.pin_memory()
                if not self._put((ids, batch)):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread and re-raised there
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[list, torch.Tensor]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- fast paths: exact transformations of a private copy of the model -----------------------------------------


def _parent_and_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _meta_call(model: nn.Module, example: torch.Tensor) -> None:
    """One forward of ``model`` with meta parameters and input: module hooks fire, nothing is computed."""
    state = {name: torch.empty_like(t, device="meta") for name, t in
             list(model.named_parameters()) + list(model.named_buffers())}
    torch.func.functional_call(model, state, (torch.empty_like(example, device="meta"),), strict=False)


def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, exclude: Sequence[str] = ()) -> list[str]:
    """Fold every eval-mode ``BatchNorm2d`` into the ``Conv2d`` that feeds it, in place; return the folded BNs.

    Why: in eval mode BN is a per-channel affine map, so ``bn(conv(x))`` is one convolution with rescaled weights
    and a bias, and the ERF (an input gradient) is unchanged up to float rounding. On CPUs the BN forward and
    backward are memory-bound passes over every activation: ~10 % of a ResNet-50 ERF pass (``bench/RESULTS.md``).

    Safety: a pair is folded only if a probe forward (on the meta device, or on ``example`` if the model cannot run
    there) shows that the BN's input *is* the conv's output, that no other operator reads that output, and that
    each module runs once. Only exact ``nn.Conv2d``/``nn.BatchNorm2d`` types are folded (subclasses such as
    weight-standardised convs or BN+activation layers compute something else), and convs named in ``exclude``
    (targets: their output would change) are left alone. Folded BNs become ``nn.Identity`` under the same name.
    """
    from torch.nn.utils import parametrize
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    convs = {m: n for n, m in model.named_modules() if type(m) is nn.Conv2d and n not in exclude
             and not parametrize.is_parametrized(m)}
    norms = {m: n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d and m.running_mean is not None
             and m.running_var is not None}
    if not convs or not norms:
        return []
    produced: dict[int, nn.Module] = {}
    consumed: dict[nn.Module, int] = {}
    calls: dict[nn.Module, int] = {}
    uses: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # keeps probe tensors alive so that their ids are not reused

    def after_conv(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        produced[id(output)] = module
        alive.append(output)

    def before_norm(module, args):
        calls[module] = calls.get(module, 0) + 1
        consumed[module] = id(args[0])
        alive.append(args[0])

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for value in tree_flatten((args, kwargs or {}))[0]:
                # only conv outputs (kept alive, so their ids are unique) are counted: a freed temporary's id
                # can be reused by a later tensor
                if isinstance(value, torch.Tensor) and id(value) in produced:
                    uses[id(value)] = uses.get(id(value), 0) + 1
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_hook(after_conv) for m in convs] + \
              [m.register_forward_pre_hook(before_norm) for m in norms]
    try:
        for attempt in ("meta", "real"):
            produced.clear(), consumed.clear(), calls.clear(), uses.clear(), alive.clear()
            try:
                with torch.no_grad(), CountReads():
                    if attempt == "meta":
                        _meta_call(model, example)
                    else:
                        model(example)
                break
            except Exception:  # noqa: BLE001 - models that create tensors on a fixed device cannot run on meta
                if attempt == "real":
                    raise
    finally:
        for handle in handles:
            handle.remove()
    folded = []
    for norm, name in norms.items():
        conv = produced.get(consumed.get(norm, -1))
        if conv is None or calls.get(conv) != 1 or calls.get(norm) != 1 or uses.get(consumed[norm]) != 1:
            continue
        if conv.out_channels != norm.num_features:
            continue
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var.double() + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight.double()
            bias = -norm.running_mean.double() * scale
            if conv.bias is not None:
                bias = bias + conv.bias.double() * scale
            if norm.bias is not None:
                bias = bias + norm.bias.double()
            weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
            conv.weight.data = weight.to(conv.weight.dtype).contiguous()
            if conv.bias is None:
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            else:
                conv.bias.data = bias.to(conv.bias.dtype)
        parent, child = _parent_and_name(model, name)
        setattr(parent, child, nn.Identity())
        folded.append(name)
    return folded


#: Per-thread depth of FFT-computed convolutions in progress: their internal operators (FFTs, padding, slicing)
#: amount to one zero-padded convolution, a local operator (see :class:`_OperatorLog`).
_FFT_CONVOLUTION = threading.local()


def _fft_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Conv2d.forward`` of an FFT-computed depthwise conv (see :func:`use_fft_depthwise`)."""
    from erf_tools.models.replknet import fft_depthwise_conv2d

    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    _FFT_CONVOLUTION.depth = getattr(_FFT_CONVOLUTION, "depth", 0) + 1
    try:
        with torch.autocast(x.device.type, enabled=False):  # no reduced-precision FFTs on CPUs; fp32 spectra
            out = fft_depthwise_conv2d(x.float().contiguous(), self.weight.float(),
                                       None if self.bias is None else self.bias.float())
    finally:
        _FFT_CONVOLUTION.depth -= 1
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(x.dtype)


def use_fft_depthwise(model: nn.Module, min_kernel_size: int, *, exclude: Sequence[str] = ()) -> list[str]:
    """Compute stride-1, 'same'-padded depthwise convolutions with kernels of at least ``min_kernel_size`` through
    FFTs, in place (an instance-level ``forward``; module names and hooks are unchanged); return their names.

    Why: a direct K×K depthwise conv costs O(K²) per output pixel and its CPU backward kernels are slow for large K;
    through FFTs the cost is O(log HW) per pixel whatever K, which pays for RepLKNet's 27–31 px kernels
    (``bench/RESULTS.md``) and not for 7–13 px ones. The result is the same to float32 rounding.
    """
    changed = []
    for name, module in model.named_modules():
        if type(module) is not nn.Conv2d or name in exclude:
            continue
        kh, kw = module.kernel_size
        padding = module.padding if module.padding != "same" else (kh // 2, kw // 2)
        if (module.groups == module.in_channels == module.out_channels and tuple(module.stride) == (1, 1)
                and tuple(module.dilation) == (1, 1) and module.padding_mode == "zeros" and kh % 2 and kw % 2
                and tuple(padding) == (kh // 2, kw // 2) and max(kh, kw) >= min_kernel_size):
            module.forward = _fft_conv_forward.__get__(module, nn.Conv2d)
            changed.append(name)
    return changed


#: smallest depthwise kernel computed by FFT under ``fast=True`` (CPU crossover, ``bench/RESULTS.md``: 27–31 px pay)
FFT_DEPTHWISE_MIN_KERNEL = 27


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
            raise ValueError(f"re-parameterisation removes the target module(s) {lost}; measure them without "
                             "reparameterize=True")
    if fold_bn:
        example = torch.zeros(1, 3, *input_hw, device=_module_device(work))
        with _frozen_eval(work):
            info["folded_batchnorms"] = len(fold_batchnorm(work, example, exclude=names))
    if fft_depthwise:
        info["fft_depthwise_convs"] = len(use_fft_depthwise(work, int(fft_depthwise), exclude=names))
    if channels_last:
        work = work.to(memory_format=torch.channels_last)
    return work, info


#: Operators that act locally on spatial maps (pointwise, convolutions, pools, eval BN, channel concatenation): a
#: feature map computed only through them depends on a bounded window of the input. Reshapes, reductions over space,
#: attention, sampling, FFTs and anything else are not in the list, and targets behind them are never cropped.
_LOCAL_OPERATORS = frozenset({
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


class _OperatorLog(TorchDispatchMode):
    """Names of the operators a forward runs, with the position at which each target was produced."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, len(self.names))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if getattr(_FFT_CONVOLUTION, "depth", 0):  # inside an FFT-computed (zero-padded, linear) convolution
            name = "aten.convolution.default"
        elif name == "aten.cat.default":  # concatenation along channels only
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
            name = name if dim in (1, -3) else "aten.cat.default (spatial)"
        self.names.append(name)
        return func(*args, **(kwargs or {}))

    def local_until(self, position: int) -> bool:
        return all(name in _LOCAL_OPERATORS for name in self.names[:position])


@dataclass(frozen=True)
class _Crop:
    """An input window that contains the whole receptive field of a target's centre unit, and that unit's index
    in the feature map of the window.

    Why: the backward pass of an early target (ResNet ``layer1`` at 224: a 35-pixel field) costs as much per pixel
    as that of the last one, but the gradient is zero outside its receptive field. Running the model on the window
    alone gives the same centre activation and the same gradient when every operator up to the target is local
    (checked: :data:`_LOCAL_OPERATORS`), the window starts on a multiple of the target's total stride (the
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


def _same_gradient(full: torch.Tensor, cropped: torch.Tensor, crop: _Crop) -> bool:
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


class _Engine:
    """Holds what stays fixed during one measurement; ``process`` turns one batch into per-sample maps."""

    def __init__(self, model, targets, options, device, precision, channels_last, crop_early_targets=True):
        self.model = model
        self.targets = targets
        self.options = options
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.crop_early_targets = crop_early_targets
        self.crops: dict[str, _Crop] = {}
        #: objective scale under fp16 (see :meth:`_input_gradient`); 1 otherwise (bf16 has float32's range)
        self.grad_scale = 2.0 ** 12 if precision == "fp16" else 1.0
        self.geometry: dict[str, _TargetGeometry] | None = None

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _high_resolution_in_fp32(self, x: torch.Tensor):
        """Under reduced precision, run the stem and the stages at total stride ≤ ``FP32_MAX_STRIDE`` in float32;
        autocast starts at the first stage beyond (timm ``feature_info``). Models that declare no stages keep
        only the convolutions that read the input itself (the stem) in float32.

        Why: the input gradient is made by the last steps of the backward pass, through the high-resolution layers,
        and the protocols reduce it over RGB with cancellation (Kim et al. average the signed gradient before the
        clamp), so bf16 rounding there is what the maps feel most. resnet50 @224, Kim protocol, 32 images: Pearson
        to the fp32 map 0.99789 with only the stem in float32, 0.99928 with stride ≤ 8 in float32, for 23 % more
        time (``bench/RESULTS.md``); the deep stages, where most of the work of RepLKNet and UniConvNet lies at
        1024², stay bf16.
        """
        if self.precision == "fp32":
            return nullcontext()
        device_type = self.device.type
        states: list[bool] = []

        def before(module, args):
            if args and args[0] is x:
                states.append(torch.is_autocast_enabled(device_type))
                torch.set_autocast_enabled(device_type, False)
                module._erf_fp32_stem = True

        def after(module, args, output):
            if getattr(module, "_erf_fp32_stem", False):
                del module._erf_fp32_stem
                torch.set_autocast_enabled(device_type, states.pop())

        convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        handles = [m.register_forward_pre_hook(before) for m in convs] + \
                  [m.register_forward_hook(after, always_call=True) for m in convs]
        outer = torch.is_autocast_enabled(device_type)
        low_resolution = next((self.model.get_submodule(name) for name, reduction
                               in feature_reductions(self.model).items() if reduction > FP32_MAX_STRIDE), None)
        if low_resolution is not None:
            torch.set_autocast_enabled(device_type, False)
            handles.append(low_resolution.register_forward_pre_hook(
                lambda module, args: torch.set_autocast_enabled(device_type, outer)))

        @contextmanager
        def scope():
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
                while states:  # a forward that stopped inside the stem
                    torch.set_autocast_enabled(device_type, states.pop())
                torch.set_autocast_enabled(device_type, outer)

        return scope()

    def process(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample maps (B×H×W, float32) of every target for one batch; splits the batch on out-of-memory."""
        try:
            return self._process(batch)
        except RuntimeError as exc:
            if not _is_out_of_memory(exc) or batch.shape[0] == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"out of memory at batch size {batch.shape[0]}; retrying in halves", stacklevel=2)
            half = batch.shape[0] // 2
            first, second = self.process(batch[:half]), self.process(batch[half:])
            return {k: torch.cat([first[k], second[k]]) for k in first}

    def _process(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        x = batch.to(self.device, torch.float32, non_blocking=True)  # asynchronous from pinned (prefetched) memory
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        input_hw = tuple(x.shape[-2:])
        first = self.geometry is None
        full_targets = [t for t in self.targets if t.module_name not in self.crops]
        maps: dict[str, torch.Tensor] = {}
        candidates: dict[str, _Crop] = {}
        full_gradients: dict[str, torch.Tensor] = {}
        if full_targets:
            log = LayerLog(self.model) if first else None
            ops = _OperatorLog() if first and self.crop_early_targets else None
            with FeatureCapture(self.model, full_targets) as capture:
                if first:
                    capture.on_capture = lambda name: (log.mark(name), ops.mark(name) if ops is not None else None)
                try:
                    with torch.enable_grad(), self._autocast(), self._high_resolution_in_fp32(x), \
                            (ops if ops is not None else nullcontext()):
                        outputs = capture.run(x)
                finally:
                    if log is not None:
                        log.close()
            grids = {t.module_name: to_nchw(outputs[t.module_name], self.model, input_hw, t.layout, t.name)
                     for t in full_targets}
            if first:
                self.geometry = self._geometry(grids, log, input_hw)
                if ops is not None:
                    candidates = self._plan_crops(log, ops, input_hw)
            for index, target in enumerate(full_targets):
                grid = grids[target.module_name]
                objective = centre_objective(grid, self.geometry[target.module_name].unit, self.options)
                if not objective.requires_grad:
                    raise RuntimeError(
                        f"target {target.name!r} does not depend on the input through differentiable operations"
                    )
                gradient = self._input_gradient(objective, x, retain_graph=index < len(full_targets) - 1)
                maps[target.module_name] = per_sample_maps(gradient, self.options)
                if target.module_name in candidates:
                    full_gradients[target.module_name] = gradient.detach()
            del grids, outputs
        for target in self.targets:
            crop = self.crops.get(target.module_name)
            if crop is not None:
                maps[target.module_name] = per_sample_maps(self._cropped_gradient(x, target, crop).float(),
                                                           self.options)
        for name, crop in candidates.items():  # first batch: adopt a crop only if it reproduces the full gradient
            target = next(t for t in self.targets if t.module_name == name)
            if _same_gradient(full_gradients[name], self._cropped_gradient(x, target, crop), crop):
                self.crops[name] = crop
        return {t.module_name: maps[t.module_name] for t in self.targets}

    def _input_gradient(self, objective: torch.Tensor, inputs: torch.Tensor, retain_graph: bool) -> torch.Tensor:
        """∂objective/∂inputs in float32; under fp16 with a scaled objective, so that small gradients do not
        underflow float16 (its smallest normal is 6e-5, ERF gradients at 1024² are far smaller).

        The maps are positively homogeneous in the gradient (ReLU, abs, sums, means), so dividing by the scale
        afterwards gives the unscaled maps. On overflow (a non-finite gradient) the scale is divided by 16 and the
        gradient recomputed from the kept graph; at scale 1 non-finite values are the model's own and are left to
        the per-image NaN/Inf rejection.
        """
        if self.grad_scale == 1.0:
            (gradient,) = torch.autograd.grad(objective, inputs, retain_graph=retain_graph)
            return gradient.float()
        while True:
            (gradient,) = torch.autograd.grad(objective * self.grad_scale, inputs, retain_graph=True)
            gradient = gradient.float()
            if self.grad_scale == 1.0 or bool(torch.isfinite(gradient).all()):
                return gradient / self.grad_scale
            self.grad_scale = max(self.grad_scale / 16.0, 1.0)

    def _cropped_gradient(self, x: torch.Tensor, target: Target, crop: _Crop) -> torch.Tensor:
        """The input gradient of ``target``'s centre objective computed on the window ``crop`` of ``x`` only,
        returned at full size (zero outside the window, where it is exactly zero anyway)."""
        window = x.detach()[:, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
        window = window.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        window.requires_grad_(True)
        with FeatureCapture(self.model, [target]) as capture:
            with torch.enable_grad(), self._autocast(), self._high_resolution_in_fp32(window):
                output = capture.run(window)[target.module_name]
        grid = to_nchw(output, self.model, (crop.height, crop.width), target.layout, target.name)
        objective = centre_objective(grid, crop.unit, self.options)
        gradient = self._input_gradient(objective, window, retain_graph=False)
        full = gradient.new_zeros(x.shape)
        full[:, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width] = gradient
        return full

    def _plan_crops(self, log: LayerLog, ops: _OperatorLog, input_hw) -> dict[str, _Crop]:
        """Windows of the input that contain the whole receptive field of a target's centre unit (see
        :class:`_Crop`), for targets reached through local operators only and whose window is at most half the
        input."""
        crops = {}
        for target in self.targets:
            name = target.module_name
            geometry = self.geometry[name]
            if name not in ops.marks or not ops.local_until(ops.marks[name]) or geometry.rf_centre is None:
                continue
            events = log.events[: log.marks.get(name, len(log.events))]
            spans = []
            for axis in (0, 1):
                stride = geometry.stride[axis]
                if stride != int(stride) or stride < 1:
                    break
                stride, size = int(stride), input_hw[axis]
                # every spatial layer up to the target widens the field (a sum over all layers bounds every path)
                extent = 1 + sum((e.kernel[axis] - 1) * e.dilation[axis] * math.ceil(size / e.in_hw[axis])
                                 for e in events)
                centre = geometry.rf_centre[axis]
                low = max(math.floor(centre - (extent - 1) / 2) - stride, 0)
                high = min(math.ceil(centre + (extent - 1) / 2) + stride, size - 1)
                origin = low // stride * stride
                # keep length ≡ size (mod stride): every layer then sees the same size parity (same padding)
                length = size - (origin + size - high - 1) // stride * stride
                spans.append((origin, length, geometry.unit[axis] - origin // stride))
            if len(spans) == 2 and spans[0][1] * spans[1][1] <= 0.5 * input_hw[0] * input_hw[1]:
                (top, height, row), (left, width, col) = spans
                crops[name] = _Crop(top, left, height, width, (row, col))
        return crops

    def _geometry(self, grids, log: LayerLog, input_hw) -> dict[str, _TargetGeometry]:
        geometry = {}
        for target in self.targets:
            grid = grids[target.module_name]
            channels, height, width = grid.shape[1:]
            if self.options.channels is not None and max(self.options.channels) >= channels:
                raise ValueError(f"channels={self.options.channels} exceeds the {channels} channels of {target.name!r}")
            unit = centre_unit(self.options.centre, height, width)
            events = log.events[: log.marks.get(target.module_name, len(log.events))]
            offsets, strides = path_geometry(events, input_hw, (height, width))
            geometry[target.module_name] = _TargetGeometry(
                target, (int(channels), int(height), int(width)), unit, unit_centre(unit, offsets, strides), strides
            )
        return geometry


def _fingerprint(model_name, targets, options, input_hw, source_description, precision="fp32") -> dict[str, Any]:
    return {"model": model_name, "targets": [t.module_name for t in targets], "options": options.to_dict(),
            "input_size": list(input_hw), "source": source_description, "precision": precision}


def save_partial(path: Path, accumulators: dict[str, ERFAccumulator], processed: int, fingerprint: dict) -> None:
    """Checkpoint every accumulator and the number of images consumed, atomically (for ``resume=True``)."""
    import json

    arrays = {"processed": np.array(processed), "fingerprint": np.array(json.dumps(fingerprint, sort_keys=True))}
    for index, accumulator in enumerate(accumulators.values()):
        arrays.update({f"t{index}.{k}": v for k, v in accumulator.state().items()})
    atomic_write_bytes(Path(path), lambda f: np.savez(f, **arrays))


def load_partial(path: Path, accumulators: dict[str, ERFAccumulator], fingerprint: dict) -> int:
    """Restore accumulators from :func:`save_partial`; return how many images were already consumed."""
    import json

    with np.load(path, allow_pickle=False) as data:
        saved = json.loads(str(data["fingerprint"]))
        if saved != json.loads(json.dumps(fingerprint, sort_keys=True)):
            raise ValueError(
                f"the partial result {str(path)!r} was made with other settings (model, targets, options, size, "
                "images or precision) and cannot be resumed; delete it or run without --resume"
            )
        for index, accumulator in enumerate(accumulators.values()):
            accumulator.load_state({k.split(".", 1)[1]: data[k] for k in data.files if k.startswith(f"t{index}.")})
        return int(data["processed"])


@dataclass
class Measurement:
    """Accumulators and context of one (possibly sharded) measurement, before they become :class:`ERFResult`\\ s.

    :func:`measure_erf` turns it into results at once; :mod:`erf_tools.distributed` first merges the accumulators
    of every rank.
    """

    accumulators: dict[str, ERFAccumulator]
    geometry: dict[str, _TargetGeometry] | None
    targets: list[Target]
    model_name: str
    protocol: str
    options: ERFOptions
    weights_info: WeightsInfo
    source_description: dict[str, Any]
    preprocess: Preprocessing | None
    input_hw: tuple[int, int]
    seed: int
    shard: tuple[int, int]
    done: int
    elapsed: float
    engine: dict[str, Any]
    partial_path: Path | None = None

    def results(self) -> list[ERFResult]:
        if self.geometry is None:
            raise ValueError("no image was processed: the image source is empty")
        return [
            _build_result(self.accumulators[t.module_name], self.geometry[t.module_name], self.model_name,
                          self.protocol, self.options, self.weights_info, self.source_description, self.preprocess,
                          self.input_hw, self.seed, self.elapsed, self.done, self.shard, self.engine)
            for t in self.targets
        ]


def measure_erf(
    model: nn.Module | str,
    images: torch.Tensor | str | Path | ImageSource = "sample",
    *,
    targets: str | nn.Module | Sequence[str | nn.Module] | None = None,
    protocol: str = "replknet",
    batch_size: int | str = 8,
    device: str | torch.device = "cpu",
    num_images: int | None = None,
    weights: str | None = None,
    seed: int = 0,
    precision: str = "fp32",
    channels_last: bool = False,
    keep_per_image: bool = True,
    per_image_resolution: int = 256,
    progress: Callable[[int, int], None] | None = None,
    partial_path: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
    reparameterize: bool = False,
    fold_bn: bool = False,
    fft_depthwise: int | None = None,
    memory_budget: int | None = None,
    prefetch: bool | None = None,
    workers: int = 1,
    fast: bool = False,
    **options: Any,
) -> ERFResult | list[ERFResult]:
    """Measure the effective receptive field of ``model`` at one or several target layers.

    Parameters
    ----------
    model: an ``nn.Module`` (used as is, put in eval mode for the call) or a model name for timm /
        erf-tools' registry (built with ``weights``: ``"random"`` (default), ``"active"``, a checkpoint path, or
        ``"timm"`` / ``"timm:<tag>"`` for pretrained weights).
    images: an N×3×H×W tensor of preprocessed inputs, a folder, ``"sample"`` (bundled photographs),
        ``"synthetic"`` (independent dead-leaves images, :mod:`erf_tools.synthetic_images`) or ``"noise"``.
    targets: None (the family's documented ERF layer), a module name, ``"stage:N"``, a module, or a list of them;
        all targets come from one forward pass.
    protocol: ``"replknet"``, ``"kim2023"`` or ``"luo2016"``; ``**options`` override single choices
        (see :class:`erf_tools.protocols.ERFOptions`, e.g. ``gradient="abs"``, ``input_size=512``).
    batch_size: images per forward/backward (the result does not depend on it beyond float rounding), or
        ``"auto"``: the largest batch whose estimated peak memory fits ``memory_budget`` bytes (default: what is
        free on ``device``), see :func:`erf_tools.memory.auto_batch_size`.
    precision: ``"fp32"`` (exact protocol), or ``"bf16"``/``"fp16"`` autocast for the forward (maps still accumulate
        exactly, see :class:`ExactSum`).
    channels_last: run the model with NHWC weights and inputs (on a private copy of the model).
    reparameterize, fold_bn, fft_depthwise: exact fast paths applied to a private copy (see :func:`prepare_model`):
        ``structural_reparam()`` for models that have it (RepLKNet), BN folded into convs, FFTs for depthwise
        convs with kernels of at least ``fft_depthwise`` pixels. Maps change by float rounding only.
    fast: turn on every one of these exact fast paths that applies to the model (:func:`exact_fast_paths`);
        the flags above add to it. RepLKNet-31B at 1024: 2.7x the published loop (``bench/RESULTS.md``).
    keep_per_image: keep per-image maps block-summed to at most ``per_image_resolution`` pixels a side (bootstrap).
    progress: called as ``progress(images_done, images_total)`` after each batch.
    partial_path, checkpoint_every, resume: checkpoint the accumulators every ``checkpoint_every`` images to
        ``partial_path`` (and whenever the run stops on an exception); with ``resume=True`` continue from it
        (same settings required). An interrupted run loses at most ``checkpoint_every`` images of work.
    shard: (rank, world_size): this process takes images rank, rank + world_size, ... (see
        :mod:`erf_tools.distributed`).
    prefetch: prepare the next batches in a background thread (default: on for accelerators, off on CPU where
        the compute threads already use every core).
    workers: batches computed concurrently by this many threads, each with its own copy of the model and an equal
        share of the intra-op threads (CPU). For models whose operators use one core whatever the thread count
        (``grid_sample``-based deformable convolutions: UniConvNet), ``workers=os.cpu_count()`` runs one image per
        core. Accumulation stays in image order, so the result is that of ``workers=1``.

    Returns one :class:`ERFResult`, or a list of them (in target order) when ``targets`` is a list.
    """
    measurement = _measure(
        model, images, targets=targets, protocol=protocol, batch_size=batch_size, device=device,
        num_images=num_images, weights=weights, seed=seed, precision=precision, channels_last=channels_last,
        keep_per_image=keep_per_image, per_image_resolution=per_image_resolution, progress=progress,
        partial_path=partial_path, checkpoint_every=checkpoint_every, resume=resume, shard=shard,
        reparameterize=reparameterize, fold_bn=fold_bn, fft_depthwise=fft_depthwise, memory_budget=memory_budget,
        prefetch=prefetch, workers=workers, fast=fast, **options)
    results = measurement.results()
    partial = measurement.partial_path
    if partial is not None and partial.is_file() and shard[1] == 1:
        partial.unlink()
    return results if isinstance(targets, (list, tuple)) else results[0]


def _module_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _measure(
    model, images, *, targets, protocol, batch_size, device, num_images, weights, seed, precision, channels_last,
    keep_per_image, per_image_resolution, progress, partial_path, checkpoint_every, resume, shard,
    reparameterize=False, fold_bn=False, fft_depthwise=None, memory_budget=None, prefetch=None, workers=1,
    fast=False, **options,
) -> Measurement:
    """The extraction loop behind :func:`measure_erf`; returns the accumulators with their context."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    rank, world = shard
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
    opts = resolve_options(protocol, **options)
    if isinstance(model, str):
        model_name = model
        model, weights_info = load_model(model_name, weights or "random", seed=seed)
    else:
        model_name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        if weights is not None:
            raise ValueError("weights= applies to a model given by name; load weights into the module yourself")
        silenced = find_silenced_branches(model)
        weights_info = WeightsInfo(source="module", init_mode="as given", silenced_branches=silenced)
    if weights_info.init_mode in ("default", "as given"):
        warn_if_silenced(model, model_name)
    device = torch.device(device)
    model = model.to(device)
    resolved = resolve_targets(model, targets)
    if fast:
        chosen = exact_fast_paths(model)
        channels_last, fold_bn = channels_last or chosen["channels_last"], fold_bn or chosen["fold_bn"]
        reparameterize = reparameterize or chosen["reparameterize"]
        fft_depthwise = fft_depthwise or chosen["fft_depthwise"]

    stream, source_description, preprocess = _input_stream(images, model, opts, num_images, seed, shard)
    total_images = source_description["num_images"]
    input_hw = tuple(source_description["input_size"])
    factor = max(1, -(-max(input_hw) // per_image_resolution))
    accumulators = {t.module_name: ERFAccumulator(tuple(input_hw), factor, keep_per_image) for t in resolved}
    fingerprint = _fingerprint(model_name, resolved, opts, input_hw, source_description, precision)

    done = 0
    partial = Path(partial_path) if partial_path is not None else None
    if resume and partial is not None and partial.is_file():
        done = load_partial(partial, accumulators, fingerprint)
    stream_factory = stream
    stream = stream_factory(done)

    work, engine_info = prepare_model(model, resolved, input_hw, reparameterize=reparameterize, fold_bn=fold_bn,
                                      fft_depthwise=fft_depthwise, channels_last=channels_last)
    if batch_size == "auto":
        from erf_tools.memory import auto_batch_size

        from erf_tools.memory import available_memory

        budget = (memory_budget if memory_budget is not None else available_memory(device)) // workers
        batch_size = auto_batch_size(work, input_hw, budget, targets=[t.module_name for t in resolved],
                                     protocol=protocol, precision=precision, channels_last=channels_last,
                                     device=device, **options)
        batch_size = max(1, min(batch_size, -(-(total_images - done) // workers)))
        engine_info["auto_batch_size"] = True
    engine_info |= {"batch_size": batch_size, "precision": precision, "channels_last": channels_last,
                    "device": str(device), "shard": list(shard)}
    if workers > 1:
        engine_info["workers"] = workers
    engines = [_Engine(work if i == 0 else copy.deepcopy(work), resolved, opts, device, precision, channels_last)
               for i in range(workers)]
    if prefetch is None:
        prefetch = device.type != "cpu"
    batches = _batches(stream, batch_size)
    prefetcher = _Prefetcher(batches, pin_memory=device.type == "cuda") if prefetch else None
    started = time.perf_counter()
    last_saved = done
    first_batch: tuple[float, int] | None = None  # (seconds, images) of the first batch: probes and window checks
    with contextlib.ExitStack() as stack:
        for engine in engines:
            stack.enter_context(_frozen_eval(engine.model))
        computed = _compute(engines, prefetcher if prefetcher is not None else batches, stack)
        try:
            for ids, maps in computed:
                for name, accumulator in accumulators.items():
                    accumulator.add(maps[name], ids)
                done += len(ids)
                if first_batch is None:
                    first_batch = (time.perf_counter() - started, len(ids))
                if partial is not None and checkpoint_every and done - last_saved >= checkpoint_every:
                    save_partial(partial, accumulators, done, fingerprint)
                    last_saved = done
                if progress is not None:  # after the checkpoint: a callback that stops the run loses nothing
                    progress(done, total_images)
        except BaseException:
            if partial is not None and done > last_saved:  # Ctrl-C, OOM, ...: keep what was computed
                save_partial(partial, accumulators, done, fingerprint)
            raise
        finally:
            computed.close()
            if prefetcher is not None:
                prefetcher.close()
        elapsed = time.perf_counter() - started
        if first_batch is not None:
            engine_info["first_batch_seconds"], engine_info["first_batch_images"] = first_batch
        windowed = sorted({name for e in engines for name in e.crops})
        if windowed:
            engine_info["windowed_targets"] = windowed
        geometry = next((e.geometry for e in engines if e.geometry is not None), None)
        if geometry is None and done > 0:  # every image came from the checkpoint: probe the geometry once
            for _ids, batch in _batches(stream_factory(0), 1):
                engines[0].process(batch)
                geometry = engines[0].geometry
                break
    return Measurement(accumulators, geometry, resolved, model_name, protocol, opts, weights_info,
                       source_description, preprocess, input_hw, seed, shard, done, elapsed, engine_info, partial)


def _compute(engines: list[_Engine], batches: Iterable, stack: contextlib.ExitStack) -> Iterator:
    """(ids, per-sample maps) of every batch, in order; with several engines, batches run concurrently in threads.

    Why threads: some models spend most of their time in operators that use a single core whatever the thread
    count (UniConvNet's ``grid_sample``, see ``bench/RESULTS.md``); with one engine (model copy) per thread and the
    intra-op threads shared out, every core works on its own image. Torch operators release the GIL, and the
    autograd engine runs CPU backward passes on the calling thread. Results are yielded in submission order, so
    accumulation, checkpoints and progress are exactly those of the serial loop.
    """
    if len(engines) == 1:
        for ids, batch in batches:
            yield ids, engines[0].process(batch)
        return
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    stack.callback(torch.set_num_threads, threads)
    torch.set_num_threads(max(1, threads // len(engines)))
    free: queue.Queue = queue.Queue()
    for engine in engines:
        free.put(engine)

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        engine = free.get()
        try:
            return engine.process(batch)
        finally:
            free.put(engine)

    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="erf-worker") as pool:
        try:
            for ids, batch in batches:
                pending.append((ids, pool.submit(run, batch)))
                if len(pending) >= len(engines):
                    ids_done, future = pending.popleft()
                    yield ids_done, future.result()
            while pending:
                ids_done, future = pending.popleft()
                yield ids_done, future.result()
        finally:
            for _ids, future in pending:
                future.cancel()


class _LazyPreprocess:
    """Stands in for a :class:`Preprocessing` inside :func:`iter_inputs`: returns a thunk instead of a tensor.

    Why: a shard (rank r of w) only needs every w-th image, and a resumed run none of those already done, but which
    images count is decided by decoding (unreadable files are skipped). Decoding stays in order; the expensive part,
    the resize to the input size (1024² bicubic), then runs only for the images this process uses.
    """

    def __init__(self, preprocess: Preprocessing) -> None:
        self.preprocess = preprocess
        self.size = preprocess.size
        self.native_size = preprocess.native_size

    def __call__(self, image) -> Callable[[], torch.Tensor]:
        preprocess = self.preprocess
        return lambda: preprocess(image)


def _input_stream(images, model, opts: ERFOptions, num_images, seed, shard):
    """A function start -> iterator of (id, tensor or thunk) for this shard, the source description, the
    preprocessing."""
    rank, world = shard
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be an N×3×H×W tensor, got shape {tuple(images.shape)}")
        if not torch.is_floating_point(images):
            raise ValueError(f"images must be a float tensor of preprocessed inputs, got {images.dtype}")
        count = images.shape[0] if num_images is None else min(num_images, images.shape[0])
        indices = list(range(rank, count, world))
        description = {"kind": "tensor", "num_images": len(indices), "input_size": list(images.shape[-2:])}

        def tensor_stream(start: int) -> Iterator:
            return ((f"tensor[{i}]", images[i]) for i in indices[start:])

        return tensor_stream, description, None
    source = images if isinstance(images, ImageSource) else open_image_source(images, num_images=num_images, seed=seed)
    preprocess = preprocessing_for(opts.preprocessing, model, opts.input_size)
    if preprocess is None:
        raise ValueError("preprocessing='none' needs images given as a tensor")
    wanted = num_images if num_images is not None else len(source.ids)

    def source_stream(start: int) -> Iterator:
        stream = iter_inputs(source, _LazyPreprocess(preprocess), num_images=wanted)
        shard_items = (item for i, item in enumerate(stream) if i % world == rank)
        return (item for i, item in enumerate(shard_items) if i >= start)

    description = source.describe() | {"num_images": len(range(rank, min(wanted, len(source.ids)), world)),
                                       "input_size": list(preprocess.size)}
    return source_stream, description, preprocess


def _build_result(accumulator, geometry: _TargetGeometry, model_name, protocol, opts, weights_info, source_description,
                  preprocess: Preprocessing | None, input_hw, seed, elapsed, done, shard,
                  engine: dict[str, Any] | None = None) -> ERFResult:

    if accumulator.rejected:
        warnings.warn(
            f"{len(accumulator.rejected)} image(s) gave NaN/Inf gradients at {geometry.target.name!r} and were "
            f"left out of the mean: {accumulator.rejected[:5]}",
            stacklevel=3,
        )
    if accumulator.count == 0:
        warnings.warn(f"no valid image for target {geometry.target.name!r}: the map is all zeros", stacklevel=3)
    elif not accumulator.total.any():
        warnings.warn(
            f"the ERF of {geometry.target.name!r} is zero everywhere: the centre objective does not depend on the "
            "input with these options and weights (e.g. the channel mean of a LayerNorm output whose weight is 1 and "
            "bias 0 is always 0; use trained or weights='active' weights, or channel_reduction='sum')",
            stacklevel=3,
        )
    return ERFResult(
        map=accumulator.finalize(opts),
        per_image_maps=accumulator.per_image_array(),
        per_image_downsample=accumulator.per_image_downsample,
        num_images=accumulator.count,
        num_rejected=len(accumulator.rejected),
        rejected_images=list(accumulator.rejected),
        image_ids=list(accumulator.image_ids),
        target=geometry.target.module_name,
        feature_shape=geometry.feature_shape,
        centre_unit=geometry.unit,
        receptive_field_centre=geometry.rf_centre,
        total_stride=geometry.stride,
        input_size=tuple(input_hw),
        model=model_name,
        protocol=protocol,
        options=opts.to_dict(),
        weights=weights_info.to_dict(),
        image_source=source_description | {"shard": list(shard)},
        preprocessing=preprocess.to_dict() if preprocess is not None else {"rule": "none (tensor input)"},
        seed=seed,
        versions=_versions(),
        timing={"seconds": elapsed, "images_per_second": done / elapsed if elapsed > 0 else float("nan"),
                "engine": dict(engine or {})},
    )


def iter_results(results: ERFResult | Iterable[ERFResult]) -> list[ERFResult]:
    """Always a list, whether ``measure_erf`` returned one result or several."""
    return [results] if isinstance(results, ERFResult) else list(results)
