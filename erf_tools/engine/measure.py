"""Measuring an ERF: :func:`measure_erf`, its settings (:class:`MeasureConfig`) and the measurement loop.

The data flow: an image source (:mod:`erf_tools.images`) and a model with its targets (:mod:`erf_tools.weights`,
:mod:`erf_tools.targets`) go through the batch computation (:mod:`.engine`, fed by :mod:`.scheduling`) into exact
accumulators (:mod:`.accumulate`, checkpointed by :mod:`.partial`), which become :class:`~erf_tools.results.ERFResult`
maps. Fast paths act on a private copy of the model (:mod:`.fastpaths`); ``batch_size="auto"`` sizes batches from a
meta-device replay (:mod:`.memory`); :mod:`.distributed` spreads the images over processes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erf_tools.engine.accumulate import ERFAccumulator
from erf_tools.engine.batch_tuning import AUTO_MEMORY_SHARE, ThroughputTuner
from erf_tools.engine.convergence import DEFAULT_HALF_WIDTH, DEFAULT_MAX_IMAGES, ConvergenceRule
from erf_tools.engine.engine import PRECISIONS, ERFEngine, TargetGeometry, frozen_eval
from erf_tools.engine.fastpaths import TargetRemovedError, exact_fast_paths, prepare_model
from erf_tools.engine.memory import auto_batch_size, available_memory
from erf_tools.engine.partial import fingerprint, load_partial, save_partial
from erf_tools.engine.scheduling import Prefetcher, batches, compute_batches, input_stream
from erf_tools.images import ImageSource, Preprocessing, count_independent, warn_preprocessing_mismatch
from erf_tools.protocols import ERFOptions, resolve_options
from erf_tools.results import ERFResult
from erf_tools.targets import Target, resolve_targets
from erf_tools.weights import WeightsInfo, find_silenced_branches, load_model, warn_if_silenced

__all__ = ["BATCH_SIZE_MODES", "MeasureConfig", "Measurement", "build_result", "measure_erf", "package_versions",
           "run_measurement"]

ProgressCallback = Callable[[int, int], None]
#: ``batch_size`` values that choose the size: by measured throughput within memory, or the largest that fits
BATCH_SIZE_MODES = ("auto", "max")


@dataclass(frozen=True)
class MeasureConfig:
    """Every setting of one measurement except the model, the images and the progress callback.

    :func:`measure_erf` builds one from its keyword arguments; :mod:`.distributed`, :mod:`.memory`,
    :mod:`erf_tools.runs` and the CLI pass one along instead of repeating the keywords. ``options`` are ERF options
    overriding the protocol preset (:class:`~erf_tools.protocols.ERFOptions` fields, e.g. ``input_size``).
    See :func:`measure_erf` for the meaning of each field.
    """

    targets: str | nn.Module | Sequence[str | nn.Module] | None = None
    protocol: str = "replknet"
    batch_size: int | str = "auto"
    device: str | torch.device = "cpu"
    num_images: int | str | None = None
    weights: str | None = None
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    keep_per_image: bool = True
    per_image_resolution: int = 256
    partial_path: str | Path | None = None
    checkpoint_every: int = 0
    resume: bool = False
    shard: tuple[int, int] = (0, 1)
    reparameterize: bool = False
    fold_bn: bool = False
    fft_depthwise: int | None = None
    memory_budget: int | None = None
    prefetch: bool | None = None
    loader_threads: int | None = None
    workers: int = 1
    fast: bool = True
    batched_vjp: bool = False
    until_half_width: float = DEFAULT_HALF_WIDTH
    max_images: int = DEFAULT_MAX_IMAGES
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_keywords(cls, **keywords: Any) -> MeasureConfig:
        """A config from :func:`measure_erf`-style keywords: known fields by name, the rest as ERF options."""
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        options = dict(keywords.pop("options", {}) or {})
        options |= {k: v for k, v in keywords.items() if k not in names}
        return cls(**{k: v for k, v in keywords.items() if k in names}, options=options)

    def replace(self, **changes: Any) -> MeasureConfig:
        """A copy with some fields changed (``options`` entries are merged, not replaced)."""
        if "options" in changes:
            changes["options"] = dict(self.options) | dict(changes["options"])
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.batch_size not in BATCH_SIZE_MODES and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, 'auto' or 'max', got {self.batch_size!r}")
        if isinstance(self.num_images, str) and self.num_images != "auto":
            raise ValueError(f"num_images must be a number of images or 'auto', got {self.num_images!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if self.loader_threads is not None and (not isinstance(self.loader_threads, int) or self.loader_threads < 1):
            raise ValueError(f"loader_threads must be a positive integer, got {self.loader_threads!r}")
        rank, world = self.shard
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {self.shard!r}")


@dataclass
class Measurement:
    """Accumulators and context of one (possibly sharded) measurement, before they become :class:`ERFResult`\\ s.

    :func:`measure_erf` turns it into results at once; :mod:`erf_tools.engine.distributed` first merges the accumulators
    of every rank.
    """

    accumulators: dict[str, ERFAccumulator]
    geometry: dict[str, TargetGeometry] | None
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
        """One :class:`ERFResult` per target, in target order."""
        if self.geometry is None:
            raise ValueError("no image was processed: the image source is empty")
        return [
            build_result(self.accumulators[t.module_name], self.geometry[t.module_name], self.model_name,
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
    batch_size: int | str = "auto",
    device: str | torch.device = "cpu",
    num_images: int | str | None = None,
    weights: str | None = None,
    seed: int = 0,
    precision: str = "fp32",
    channels_last: bool = False,
    keep_per_image: bool = True,
    per_image_resolution: int = 256,
    progress: ProgressCallback | None = None,
    partial_path: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
    reparameterize: bool = False,
    fold_bn: bool = False,
    fft_depthwise: int | None = None,
    memory_budget: int | None = None,
    prefetch: bool | None = None,
    loader_threads: int | None = None,
    workers: int = 1,
    fast: bool = True,
    batched_vjp: bool = False,
    until_half_width: float = DEFAULT_HALF_WIDTH,
    max_images: int = DEFAULT_MAX_IMAGES,
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
    batch_size: images per forward/backward (the result does not depend on it beyond float rounding); ``"auto"``
        (default): chosen by measured throughput, the first batches trying 1, 2, 4, ... images up to the largest
        batch whose estimated peak memory fits half of ``memory_budget`` bytes (default: what is free on ``device``),
        see :class:`~erf_tools.engine.batch_tuning.ThroughputTuner`; ``"max"``: that largest batch
        (:func:`erf_tools.engine.memory.auto_batch_size`). What was tried is in ``timing["engine"]``.
    precision: ``"fp32"`` (exact protocol); ``"bf16"``: the forward in float32 as for fp32, the input gradients of
        convolutions and linear layers in bf16 (:mod:`erf_tools.engine.bf16_backward`; Pearson ≥ 0.999 to the
        fp32 map for every family measured, ``bench/RESULTS.md`` section bf16); ``"fp16"``: float16 autocast
        beyond stride 8 with a scaled objective. Maps still accumulate exactly (see :class:`ExactSum`).
    channels_last: run the model with NHWC weights and inputs (on a private copy of the model).
    reparameterize, fold_bn, fft_depthwise: exact fast paths applied to a private copy (see :func:`prepare_model`):
        ``structural_reparam()`` for models that have it (RepLKNet), BN folded into convs, FFTs for depthwise
        convs with kernels of at least ``fft_depthwise`` pixels. Maps change by float rounding only.
    fast: every one of these exact fast paths that applies to the model (:func:`exact_fast_paths`; default on,
        the flags above add to it; a re-parameterisation that would remove a target module is then skipped).
        ``fast=False`` measures the module as given, in the published training-time structure.
    batched_vjp: with several targets, their input gradients from one backward pass vmapped over the targets'
        cotangents instead of one backward per target (same maps to float rounding; faster only where
        per-operator overhead dominates, see ``bench/RESULTS.md``).
    num_images: how many images to use (default: all the source has), or ``"auto"``: add images until every
        target's 95 % AGD interval is at most ``until_half_width`` wide on each side, or ``max_images`` are used
        (:class:`~erf_tools.engine.convergence.ConvergenceRule`; checked at 16, 24, 36, ... images). What happened
        is recorded in ``timing["engine"]["until_converged"]``; the image source must hold ``max_images`` images.
    keep_per_image: keep per-image maps block-summed to at most ``per_image_resolution`` pixels a side (bootstrap).
    progress: called as ``progress(images_done, images_total)`` after each batch.
    partial_path, checkpoint_every, resume: checkpoint the accumulators every ``checkpoint_every`` images to
        ``partial_path`` (and whenever the run stops on an exception); with ``resume=True`` continue from it
        (same settings required). An interrupted run loses at most ``checkpoint_every`` images of work.
    shard: (rank, world_size): this process takes images rank, rank + world_size, ... (see
        :mod:`erf_tools.engine.distributed`).
    prefetch: prepare the next batches in a background thread (default: on for accelerators, off on CPU where
        the compute threads already use every core).
    loader_threads: threads that generate, decode-to-size and normalise the images of the next batches, taken in
        image order (the batches are those of one thread); default: 1 on CPU, ``min(8, os.cpu_count())`` on
        accelerators, where one core preparing 1024² inputs is slower than the device.
    workers: batches computed concurrently by this many threads, each with its own copy of the model and an equal
        share of the intra-op threads (CPU). For models whose operators use one core whatever the thread count
        (``grid_sample``-based deformable convolutions: UniConvNet), ``workers=os.cpu_count()`` runs one image per
        core. Accumulation stays in image order, so the result is that of ``workers=1``.

    Returns one :class:`ERFResult`, or a list of them (in target order) when ``targets`` is a list.
    """
    config = MeasureConfig(
        targets=targets, protocol=protocol, batch_size=batch_size, device=device, num_images=num_images,
        weights=weights, seed=seed, precision=precision, channels_last=channels_last, keep_per_image=keep_per_image,
        per_image_resolution=per_image_resolution, partial_path=partial_path, checkpoint_every=checkpoint_every,
        resume=resume, shard=shard, reparameterize=reparameterize, fold_bn=fold_bn, fft_depthwise=fft_depthwise,
        memory_budget=memory_budget, prefetch=prefetch, loader_threads=loader_threads, workers=workers, fast=fast,
        batched_vjp=batched_vjp,
        until_half_width=until_half_width, max_images=max_images, options=options)
    return measure_with_config(model, images, config, progress)


def measure_with_config(model: nn.Module | str, images: Any, config: MeasureConfig,
                        progress: ProgressCallback | None = None) -> ERFResult | list[ERFResult]:
    """:func:`measure_erf` with its settings as one :class:`MeasureConfig`."""
    measurement = run_measurement(model, images, config, progress)
    results = measurement.results()
    partial = measurement.partial_path
    if partial is not None and partial.is_file() and config.shard[1] == 1:
        partial.unlink()
    return results if isinstance(config.targets, (list, tuple)) else results[0]


def _model_and_weights(model: nn.Module | str, config: MeasureConfig) -> tuple[nn.Module, str, WeightsInfo]:
    """The module to measure, its name and where its weights came from (warning about silenced branches)."""
    if isinstance(model, str):
        model_name = model
        model, weights_info = load_model(model_name, config.weights or "random", seed=config.seed)
    else:
        model_name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        if config.weights is not None:
            raise ValueError("weights= applies to a model given by name; load weights into the module yourself")
        silenced = find_silenced_branches(model)
        weights_info = WeightsInfo(source="module", init_mode="as given", silenced_branches=silenced)
    if weights_info.init_mode in ("default", "as given"):
        warn_if_silenced(model, model_name)
    return model.to(torch.device(config.device)), model_name, weights_info


def _with_fast_paths(model: nn.Module, config: MeasureConfig) -> MeasureConfig:
    """``fast=True``: every exact fast path that applies to the model, added to those asked for."""
    if not config.fast:
        return config
    chosen = exact_fast_paths(model)
    return config.replace(channels_last=config.channels_last or chosen["channels_last"],
                          fold_bn=config.fold_bn or chosen["fold_bn"],
                          reparameterize=config.reparameterize or chosen["reparameterize"],
                          fft_depthwise=config.fft_depthwise or chosen["fft_depthwise"])


def _prepared_model(model: nn.Module, resolved: list[Target], input_hw: tuple[int, int], config: MeasureConfig,
                    explicit: MeasureConfig) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`prepare_model` with the fast paths of ``config``; a re-parameterisation that only ``fast`` added (not
    ``explicit``, the caller's own flags) is dropped when it would remove a target module."""
    try:
        return prepare_model(model, resolved, input_hw, reparameterize=config.reparameterize, fold_bn=config.fold_bn,
                             fft_depthwise=config.fft_depthwise, channels_last=config.channels_last)
    except TargetRemovedError:
        if explicit.reparameterize or not config.reparameterize:
            raise
    work, info = prepare_model(model, resolved, input_hw, reparameterize=False, fold_bn=config.fold_bn,
                               fft_depthwise=config.fft_depthwise, channels_last=config.channels_last)
    return work, info | {"reparameterized": False, "reparameterize_skipped": "it would remove a target module"}


def _batch_size(work: nn.Module, resolved: list[Target], input_hw: tuple[int, int], remaining: int,
                config: MeasureConfig) -> int | ThroughputTuner:
    """A fixed batch size, or for ``batch_size="auto"`` a :class:`ThroughputTuner` within the largest batch that
    fits the memory budget (``"max"``: that largest batch itself; also ``"auto"`` with several workers, whose
    batches overlap in time and cannot be timed one by one)."""
    if config.batch_size not in BATCH_SIZE_MODES:
        return int(config.batch_size)
    per_worker = -(-remaining // config.workers)
    if per_worker <= 2 and config.batch_size == "auto":
        cap = max(per_worker, 1)  # nothing to choose from: skip the memory replay
    else:
        device = torch.device(config.device)
        budget = (config.memory_budget if config.memory_budget is not None else available_memory(device)) \
            // config.workers
        if config.batch_size == "auto" and config.workers == 1:
            budget = int(budget * AUTO_MEMORY_SHARE)
        options = {k: v for k, v in config.options.items() if k != "input_size"}  # input_hw is the size
        cap = auto_batch_size(work, input_hw, budget, targets=[t.module_name for t in resolved],
                              protocol=config.protocol, precision=config.precision,
                              channels_last=config.channels_last, device=device, **options)
        cap = max(1, min(cap, per_worker))
    if config.batch_size == "max" or config.workers > 1:
        return cap
    return ThroughputTuner(cap)


def run_measurement(model: nn.Module | str, images: Any, config: MeasureConfig,
                    progress: ProgressCallback | None = None) -> Measurement:
    """The extraction loop behind :func:`measure_erf`; returns the accumulators with their context (not yet
    results, so that :mod:`.distributed` can merge the shards first)."""
    config.validate()
    opts = resolve_options(config.protocol, **config.options)
    model, model_name, weights_info = _model_and_weights(model, config)
    device = torch.device(config.device)
    resolved = resolve_targets(model, config.targets)
    explicit = config
    config = _with_fast_paths(model, config)
    seed, shard, precision = config.seed, config.shard, config.precision
    rule = (ConvergenceRule(config.until_half_width, config.max_images, seed=seed)
            if config.num_images == "auto" else None)
    wanted = config.max_images if rule is not None else config.num_images

    stream, source_description, preprocess = input_stream(images, model, opts, wanted, seed, shard)
    if weights_info.init_mode == "loaded":  # trained weights: say when the protocol normalises differently
        warn_preprocessing_mismatch(opts.preprocessing, preprocess, model, model_name)
    total_images = source_description["num_images"]
    input_hw = tuple(source_description["input_size"])
    factor = max(1, -(-max(input_hw) // config.per_image_resolution))
    accumulators = {t.module_name: ERFAccumulator(tuple(input_hw), factor, config.keep_per_image) for t in resolved}
    settings_fingerprint = fingerprint(model_name, resolved, opts, input_hw, source_description, precision)

    done = 0
    partial = Path(config.partial_path) if config.partial_path is not None else None
    if config.resume and partial is not None and partial.is_file():
        done = load_partial(partial, accumulators, settings_fingerprint)
    stream_factory = stream
    stream = stream_factory(done)

    work, engine_info = _prepared_model(model, resolved, input_hw, config, explicit)
    sizing = _batch_size(work, resolved, input_hw, total_images - done, config)
    tuner = sizing if isinstance(sizing, ThroughputTuner) else None
    if config.batch_size in BATCH_SIZE_MODES:
        engine_info["auto_batch_size"] = config.batch_size
    channels_last, workers = config.channels_last, config.workers
    engine_info |= {"batch_size": sizing if tuner is None else None, "precision": precision,
                    "channels_last": channels_last, "device": str(device), "shard": list(shard)}
    if workers > 1:
        engine_info["workers"] = workers
    engines = [ERFEngine(work if i == 0 else copy.deepcopy(work), resolved, opts, device, precision, channels_last,
                         batched_vjp=config.batched_vjp) for i in range(workers)]
    prefetch = config.prefetch if config.prefetch is not None else device.type != "cpu"
    loader_threads = config.loader_threads or (1 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    if loader_threads > 1:
        engine_info["loader_threads"] = loader_threads
    batched = batches(stream, tuner.next_size if tuner is not None else sizing, loader_threads=loader_threads)
    prefetcher = Prefetcher(batched, pin_memory=device.type == "cuda") if prefetch else None
    started = time.perf_counter()
    last_saved = done
    first_batch: tuple[float, int] | None = None  # (seconds, images) of the first batch: probes and window checks
    batch_index, batch_started = 0, started
    with contextlib.ExitStack() as stack:
        for engine in engines:
            stack.enter_context(frozen_eval(engine.model))
        computed = compute_batches(engines, prefetcher if prefetcher is not None else batched, stack)
        try:
            for ids, maps in computed:
                for name, accumulator in accumulators.items():
                    accumulator.add(maps[name], ids)
                done += len(ids)
                if tuner is not None:
                    now = time.perf_counter()
                    tuner.record(batch_index, len(ids), now - batch_started)
                    batch_index, batch_started = batch_index + 1, now
                if first_batch is None:
                    first_batch = (time.perf_counter() - started, len(ids))
                if partial is not None and config.checkpoint_every and done - last_saved >= config.checkpoint_every:
                    save_partial(partial, accumulators, done, settings_fingerprint)
                    last_saved = done
                if progress is not None:  # after the checkpoint: a callback that stops the run loses nothing
                    progress(done, total_images)
                if rule is not None and rule.should_stop(done, lambda: _interim_results(
                        accumulators, engines, resolved, model_name, config.protocol, opts, weights_info,
                        source_description, preprocess, input_hw, seed, shard)):
                    break
        except BaseException:
            if partial is not None and done > last_saved:  # Ctrl-C, OOM, ...: keep what was computed
                save_partial(partial, accumulators, done, settings_fingerprint)
            raise
        finally:
            computed.close()
            if prefetcher is not None:
                prefetcher.close()
        elapsed = time.perf_counter() - started
        if first_batch is not None:
            engine_info["first_batch_seconds"], engine_info["first_batch_images"] = first_batch
        if tuner is not None:
            engine_info["batch_size"] = tuner.best
            engine_info["batch_size_tuning"] = tuner.to_dict()
        windowed = sorted({name for e in engines for name in e.crops})
        if windowed:
            engine_info["windowed_targets"] = windowed
        if rule is not None:
            engine_info["until_converged"] = rule.record(done)
            source_description = source_description | {"num_images": done}
        blind = sorted({name for e in engines for name in e.blind_targets})
        if blind:
            engine_info["blind_targets"] = blind
        geometry = next((e.geometry for e in engines if e.geometry is not None), None)
        if geometry is None and done > 0:  # every image came from the checkpoint: probe the geometry once
            for _ids, batch in batches(stream_factory(0), 1):
                engines[0].process(batch)
                geometry = engines[0].geometry
                break
    return Measurement(accumulators, geometry, resolved, model_name, config.protocol, opts, weights_info,
                       source_description, preprocess, input_hw, seed, shard, done, elapsed, engine_info, partial)


def _interim_results(accumulators, engines, targets, model_name, protocol, opts, weights_info, source_description,
                     preprocess, input_hw, seed, shard) -> list[ERFResult]:
    """The results of a running measurement so far (for :class:`ConvergenceRule`)."""
    geometry = next(e.geometry for e in engines if e.geometry is not None)
    return [build_result(accumulators[t.module_name], geometry[t.module_name], model_name, protocol, opts,
                         weights_info, source_description, preprocess, input_hw, seed, 0.0, 0, shard)
            for t in targets]


def build_result(accumulator: ERFAccumulator, geometry: TargetGeometry, model_name: str, protocol: str,
                 opts: ERFOptions, weights_info: WeightsInfo, source_description: dict[str, Any],
                 preprocess: Preprocessing | None, input_hw: Sequence[int], seed: int, elapsed: float, done: int,
                 shard: tuple[int, int], engine: dict[str, Any] | None = None) -> ERFResult:
    """The :class:`ERFResult` of one target from its accumulator, warning about rejected images and empty maps."""
    if accumulator.rejected:
        warnings.warn(
            f"{len(accumulator.rejected)} image(s) gave NaN/Inf gradients at {geometry.target.name!r} and were "
            f"left out of the mean: {accumulator.rejected[:5]}",
            stacklevel=3,
        )
    if accumulator.count == 0:
        warnings.warn(f"no valid image for target {geometry.target.name!r}: the map is all zeros", stacklevel=3)
    elif not accumulator.total.any() or geometry.target.module_name in (engine or {}).get("blind_targets", ()):
        warnings.warn(
            f"the ERF of {geometry.target.name!r} is zero everywhere (up to float rounding): the centre objective does "
            "not depend on the "
            "input with these options and weights (e.g. the channel mean of a LayerNorm output whose weight is 1 and "
            "bias 0 is always 0; use trained or weights='active' weights, or channel_reduction='sum')",
            stacklevel=3,
        )
    independent = count_independent(source_description.get("kind", "tensor"), accumulator.image_ids)
    return ERFResult(
        map=accumulator.finalize(opts),
        map_standard_error=accumulator.standard_error(opts, independent),
        num_independent_images=independent,
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
        versions=package_versions(),
        timing={"seconds": elapsed, "images_per_second": done / elapsed if elapsed > 0 else float("nan"),
                "engine": dict(engine or {})},
    )


def package_versions() -> dict[str, str]:
    """Versions of erf-tools and its main dependencies, recorded in every result."""
    import timm

    import erf_tools

    return {"erf_tools": erf_tools.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
