"""Peak memory of one ERF batch, and the largest batch size that fits a memory budget.

Why this exists: at the RepLKNet protocol's 1024×1024 the tensors autograd keeps for the input gradient dominate
everything else (several GB per image for RepLKNet-31B or UniConvNet-T, see ``bench/RESULTS.md``), and how many
images fit depends on the model, the input size, the targets (the forward stops after the last one), the precision
and the memory layout. Guessing means out-of-memory retries (the engine halves the batch when that happens, but a
CPU run can also be killed outright by the OS).

How: :func:`estimate_peak_memory` replays exactly what the extraction engine does for one batch (forward to the last
target, then one input-gradient per target) on the ``meta`` device, where tensors have shapes, dtypes and strides
but no data and no arithmetic is done, under a dispatch mode that adds up the bytes of every live tensor storage and
records the maximum. That takes seconds even for models whose real pass takes minutes on a CPU, and needs no
accelerator. Reduced precisions are replayed with fake tensors of the real device instead, because autocast (fp16)
only acts on real device types; bf16 runs a float32 forward (:mod:`erf_tools.engine.bf16_backward`), so its peak
is about that of fp32. :func:`auto_batch_size` measures batch 1 and 2, splits the peak into a fixed and a
per-image part, and divides the budget.

The replay counts tensors created by PyTorch operators. It does not see allocator fragmentation, library scratch
space (oneDNN, cuDNN workspaces) or the model weights themselves (they are already resident), so budgets are taken
with headroom (``headroom=0.85`` by default), and the engine's out-of-memory fallback stays in place.
"""
from __future__ import annotations

import copy
import math
import os
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from erf_tools.engine.engine import ERFEngine, frozen_eval
from erf_tools.layers.helpers import as_pair, module_device
from erf_tools.protocols import resolve_options
from erf_tools.targets import TargetError, resolve_targets

__all__ = [
    "LiveMemoryTracker", "MemoryEstimate", "auto_batch_size", "available_memory", "estimate_peak_memory",
    "per_image_memory",
]


class LiveMemoryTracker(TorchDispatchMode):
    """Adds up the bytes of every tensor storage created while active, minus those freed; keeps the maximum.

    A storage is counted once however many views of it exist, and un-counted when its last reference dies (a
    weak reference callback), which is when a real allocator would get the memory back.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._refs:
                continue
            nbytes = int(storage.nbytes())
            self._refs[key] = weakref.ref(storage, lambda _ref, k=key, n=nbytes: self._release(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no weight data is copied)."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of batch 1 and batch 2, and the linear model ``fixed + batch_size * per_image`` fitted to them."""

    peak_batch_1: int
    peak_batch_2: int
    fixed: int
    per_image: int
    method: str  # "meta" or "fake"

    def peak(self, batch_size: int) -> int:
        return self.fixed + batch_size * self.per_image


def estimate_peak_memory(
    model: nn.Module,
    input_size: int | tuple[int, int],
    batch_size: int = 1,
    *,
    targets=None,
    protocol: str = "replknet",
    precision: str = "fp32",
    channels_last: bool = False,
    device: str | torch.device | None = None,
    **options,
) -> int:
    """Bytes at the peak of one engine batch (forward to the last target + one input-gradient per target).

    The model's weights are not included (they are resident before and after). ``device`` is the device the real
    run will use (default: the model's); it only matters for reduced precisions, whose autocast rules depend on it.
    """
    return _replay_peak(model, as_pair(input_size), batch_size, targets, protocol, precision, channels_last, device,
                        options)[0]


def _replay_peak(model, input_hw, batch_size, targets, protocol, precision, channels_last, device, options):
    opts = resolve_options(protocol, **options)
    device = torch.device(device) if device is not None else module_device(model)
    resolved = resolve_targets(model, targets)
    if precision == "fp32":
        replica = _meta_copy(model)
        if channels_last:
            replica = replica.to(memory_format=torch.channels_last)
        engine = ERFEngine(replica, resolved, opts, "meta", "fp32", channels_last, crop_early_targets=False,
                           diagnose=False)
        tracker = LiveMemoryTracker()
        try:
            with frozen_eval(replica), tracker:
                engine.compute_batch(torch.empty(batch_size, 3, *input_hw, device="meta"))
            return tracker.peak, "meta"
        except (RuntimeError, NotImplementedError, TargetError):
            pass  # an operator without a meta kernel (complex FFTs of the FFT depthwise path): fake tensors below
    # autocast only rewrites operators of real device types, and some operators have no meta kernel: replay with
    # fake tensors of the real device
    from torch._subclasses.fake_tensor import FakeTensorMode

    engine = ERFEngine(model, resolved, opts, device, precision, channels_last, crop_early_targets=False,
                       diagnose=False)
    restore = _channels_last_in_place(model) if channels_last else nullcontext()
    with restore, frozen_eval(model), FakeTensorMode(allow_non_fake_inputs=True):
        tracker = LiveMemoryTracker()
        with tracker:
            engine.compute_batch(torch.empty(batch_size, 3, *input_hw, device=device))
    return tracker.peak, "fake"


class _channels_last_in_place:
    """Convert 4-D parameters/buffers to channels_last for the duration, then put the original tensors back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            if tensor.dim() == 4:
                self.saved.append((tensor, tensor.data))
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        return self

    def __exit__(self, *exc) -> None:
        for tensor, data in self.saved:
            tensor.data = data


def per_image_memory(
    model: nn.Module,
    input_size: int | tuple[int, int],
    *,
    targets=None,
    protocol: str = "replknet",
    precision: str = "fp32",
    channels_last: bool = False,
    device: str | torch.device | None = None,
    **options,
) -> MemoryEstimate:
    """Peak memory of batch 1 and 2 and the fixed + per-image split (see :class:`MemoryEstimate`)."""
    hw = as_pair(input_size)
    peak_1, method = _replay_peak(model, hw, 1, targets, protocol, precision, channels_last, device, options)
    peak_2, _ = _replay_peak(model, hw, 2, targets, protocol, precision, channels_last, device, options)
    per_image = max(peak_2 - peak_1, 1)
    return MemoryEstimate(peak_1, peak_2, max(peak_1 - per_image, 0), per_image, method)


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free now on ``device``: ``cudaMemGetInfo`` for CUDA, ``MemAvailable`` (Linux) or physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def auto_batch_size(
    model: nn.Module,
    input_size: int | tuple[int, int],
    memory_budget_bytes: int | None = None,
    *,
    targets=None,
    protocol: str = "replknet",
    precision: str = "fp32",
    channels_last: bool = False,
    device: str | torch.device | None = None,
    max_batch_size: int = 64,
    headroom: float = 0.85,
    **options,
) -> int:
    """The largest batch size whose estimated peak fits ``headroom * memory_budget_bytes`` (at least 1).

    memory_budget_bytes: memory the measurement may use besides the resident model weights; None = what is free
        on ``device`` now (:func:`available_memory`).
    max_batch_size: upper bound; beyond a few dozen images a batch no longer runs faster on CPUs or GPUs.
    Other arguments are those of :func:`erf_tools.measure_erf` (targets, protocol and ERF options, precision,
    channels_last), because they change what is kept for the backward pass.
    """
    device = torch.device(device) if device is not None else module_device(model)
    budget = available_memory(device) if memory_budget_bytes is None else int(memory_budget_bytes)
    estimate = per_image_memory(model, input_size, targets=targets, protocol=protocol, precision=precision,
                                channels_last=channels_last, device=device, **options)
    usable = headroom * budget - estimate.fixed
    size = math.floor(usable / estimate.per_image) if usable > 0 else 0
    return int(min(max(size, 1), max_batch_size))
