"""The extraction engine: images -> model + target layers -> ERF maps.

One forward pass per batch captures every target; one backward per target (the graph is kept between them) gives
the per-sample input gradients, because in eval mode sample b's features depend on x_b alone, so
∂(Σ_b s_b)/∂x_b = ∂s_b/∂x_b exactly. The protocol's per-sample post-processing (ReLU/abs/clamp, RGB reduction)
happens before anything is summed over images, and each sample is checked for NaN/Inf on its own. No parameter
gradients are computed. Accumulators are float64.
"""
from __future__ import annotations

import platform
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

from erf_tools.images import ImageSource, Preprocessing, iter_inputs, open_image_source, preprocessing_for
from erf_tools.protocols import ERFOptions, resolve_options
from erf_tools.receptive_field import LayerLog, path_geometry, unit_centre
from erf_tools.results import ERFResult, atomic_write_bytes
from erf_tools.targets import FeatureCapture, Target, centre_unit, resolve_targets, to_nchw
from erf_tools.weights import WeightsInfo, find_silenced_branches, load_model, warn_if_silenced

PRECISIONS = ("fp32", "bf16", "fp16")


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


@dataclass
class ERFAccumulator:
    """Running float64 sum of valid per-image maps of one target, with the bookkeeping a result needs."""

    shape: tuple[int, int]
    per_image_downsample: int = 1
    keep_per_image: bool = True
    total: np.ndarray = field(init=False)
    count: int = 0
    image_ids: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    per_image: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.shape, dtype=np.float64)

    def add(self, maps: torch.Tensor, ids: Sequence[str]) -> None:
        """Add a batch of per-image maps; images with any NaN/Inf are counted as rejected, not added."""
        maps64 = maps.detach().to("cpu", torch.float64).numpy()
        finite = np.isfinite(maps64).reshape(len(ids), -1).all(axis=1)
        for image_id, ok in zip(ids, finite):
            (self.image_ids if ok else self.rejected).append(image_id)
        valid = maps64[finite]
        self.count += int(finite.sum())
        for single in valid:  # in order, so a batched run sums exactly like one image at a time
            self.total += single
        if self.keep_per_image and len(valid):
            self.per_image.append(block_sum(valid, self.per_image_downsample).astype(np.float32))

    def merge(self, other: ERFAccumulator) -> None:
        """Fold another accumulator of the same target in (shards of a distributed run, resumed runs)."""
        self.total += other.total
        self.count += other.count
        self.image_ids += other.image_ids
        self.rejected += other.rejected
        self.per_image += other.per_image

    def finalize(self, options: ERFOptions) -> np.ndarray:
        """The protocol's map: mean or sum over valid images, then the normalisation."""
        result = self.total.copy()
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
        """Arrays to checkpoint the accumulator (see :func:`save_partial`)."""
        per_image = self.per_image_array()
        return {
            "total": self.total,
            "count": np.array(self.count),
            "image_ids": np.array(self.image_ids, dtype=str),
            "rejected": np.array(self.rejected, dtype=str),
            "per_image": per_image if per_image is not None else np.zeros((0, 0, 0), np.float32),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.total = np.array(state["total"], dtype=np.float64)
        self.count = int(state["count"])
        self.image_ids = [str(s) for s in state["image_ids"]]
        self.rejected = [str(s) for s in state["rejected"]]
        per_image = state["per_image"]
        self.per_image = [per_image] if self.keep_per_image and per_image.size else []


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
        tensors.append(tensor)
        if len(ids) == batch_size:
            yield ids, torch.stack(tensors)
            ids, tensors = [], []
    if ids:
        yield ids, torch.stack(tensors)


class _Engine:
    """Holds what stays fixed during one measurement; ``process`` turns one batch into per-sample maps."""

    def __init__(self, model, targets, options, device, precision, channels_last):
        self.model = model
        self.targets = targets
        self.options = options
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.geometry: dict[str, _TargetGeometry] | None = None

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

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
        x = batch.to(self.device, torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        input_hw = tuple(x.shape[-2:])
        log = LayerLog(self.model) if self.geometry is None else None
        with FeatureCapture(self.model, self.targets) as capture:
            if log is not None:
                capture.on_capture = log.mark
            try:
                with torch.enable_grad(), self._autocast():
                    outputs = capture.run(x)
            finally:
                if log is not None:
                    log.close()
        grids = {t.module_name: to_nchw(outputs[t.module_name], self.model, input_hw, t.layout, t.name)
                 for t in self.targets}
        if self.geometry is None:
            self.geometry = self._geometry(grids, log, input_hw)
        maps = {}
        for index, target in enumerate(self.targets):
            grid = grids[target.module_name]
            objective = centre_objective(grid, self.geometry[target.module_name].unit, self.options)
            if not objective.requires_grad:
                raise RuntimeError(
                    f"target {target.name!r} does not depend on the input through differentiable operations"
                )
            (gradient,) = torch.autograd.grad(objective, x, retain_graph=index < len(self.targets) - 1)
            maps[target.module_name] = per_sample_maps(gradient.float(), self.options)
        return maps

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


def _fingerprint(model_name, targets, options, input_hw, source_description) -> dict[str, Any]:
    return {"model": model_name, "targets": [t.module_name for t in targets], "options": options.to_dict(),
            "input_size": list(input_hw), "source": source_description}


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
                f"the partial result {str(path)!r} was made with other settings (model, targets, options, size or "
                "images) and cannot be resumed; delete it or run without --resume"
            )
        for index, accumulator in enumerate(accumulators.values()):
            accumulator.load_state({k.split(".", 1)[1]: data[k] for k in data.files if k.startswith(f"t{index}.")})
        return int(data["processed"])


def measure_erf(
    model: nn.Module | str,
    images: torch.Tensor | str | Path | ImageSource = "sample",
    *,
    targets: str | nn.Module | Sequence[str | nn.Module] | None = None,
    protocol: str = "replknet",
    batch_size: int = 8,
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
    **options: Any,
) -> ERFResult | list[ERFResult]:
    """Measure the effective receptive field of ``model`` at one or several target layers.

    Parameters
    ----------
    model: an ``nn.Module`` (used as is, put in eval mode for the call) or a model name for timm /
        erf-tools' registry (built with ``weights``: ``"random"`` (default), ``"active"``, a checkpoint path, or
        ``"timm"`` / ``"timm:<tag>"`` for pretrained weights).
    images: an N×3×H×W tensor of preprocessed inputs, a folder, ``"sample"`` (bundled photographs) or ``"noise"``.
    targets: None (the family's documented ERF layer), a module name, ``"stage:N"``, a module, or a list of them;
        all targets come from one forward pass.
    protocol: ``"replknet"``, ``"kim2023"`` or ``"luo2016"``; ``**options`` override single choices
        (see :class:`erf_tools.protocols.ERFOptions`, e.g. ``gradient="abs"``, ``input_size=512``).
    batch_size: images per forward/backward; the result does not depend on it.
    precision: ``"fp32"`` (exact protocol), or ``"bf16"``/``"fp16"`` autocast for the forward (maps still accumulate
        in float64).
    keep_per_image: keep per-image maps block-summed to at most ``per_image_resolution`` pixels a side (bootstrap).
    progress: called as ``progress(images_done, images_total)`` after each batch.
    partial_path, checkpoint_every, resume: checkpoint the accumulators every ``checkpoint_every`` images to
        ``partial_path``; with ``resume=True`` continue from it (same settings required).
    shard: (rank, world_size): this process takes images rank, rank + world_size, ... (see
        :mod:`erf_tools.distributed`).

    Returns one :class:`ERFResult`, or a list of them (in target order) when ``targets`` is a list.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
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
    model = model.to(device)
    resolved = resolve_targets(model, targets)

    stream, source_description, preprocess = _input_stream(images, model, opts, num_images, seed, shard)
    total_images = source_description["num_images"]
    input_hw = source_description["input_size"]
    factor = max(1, -(-max(input_hw) // per_image_resolution))
    accumulators = {t.module_name: ERFAccumulator(tuple(input_hw), factor, keep_per_image) for t in resolved}
    fingerprint = _fingerprint(model_name, resolved, opts, input_hw, source_description)

    done = 0
    partial = Path(partial_path) if partial_path is not None else None
    if resume and partial is not None and partial.is_file():
        done = load_partial(partial, accumulators, fingerprint)
        stream = stream(done)
    else:
        stream = stream(0)

    engine = _Engine(model, resolved, opts, device, precision, channels_last)
    started = time.perf_counter()
    last_saved = done
    with _frozen_eval(model):
        try:
            for ids, batch in _batches(stream, batch_size):
                maps = engine.process(batch)
                for name, accumulator in accumulators.items():
                    accumulator.add(maps[name], ids)
                done += len(ids)
                if progress is not None:
                    progress(done, total_images)
                if partial is not None and checkpoint_every and done - last_saved >= checkpoint_every:
                    save_partial(partial, accumulators, done, fingerprint)
                    last_saved = done
        except BaseException:
            if partial is not None and done > last_saved:  # Ctrl-C, OOM, ...: keep what was computed
                save_partial(partial, accumulators, done, fingerprint)
            raise
    elapsed = time.perf_counter() - started
    if engine.geometry is None:
        raise ValueError("no image was processed: the image source is empty")

    results = [
        _build_result(accumulators[t.module_name], engine.geometry[t.module_name], model_name, protocol, opts,
                      weights_info, source_description, preprocess, input_hw, seed, elapsed, done, shard)
        for t in resolved
    ]
    if partial is not None and partial.is_file() and shard[1] == 1:
        partial.unlink()
    return results if isinstance(targets, (list, tuple)) else results[0]


def _input_stream(images, model, opts: ERFOptions, num_images, seed, shard):
    """A function start -> iterator of (id, tensor) for this shard, the source description, the preprocessing."""
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
        stream = iter_inputs(source, preprocess, num_images=wanted)
        shard_items = (item for i, item in enumerate(stream) if i % world == rank)
        return (item for i, item in enumerate(shard_items) if i >= start)

    description = source.describe() | {"num_images": len(range(rank, min(wanted, len(source.ids)), world)),
                                       "input_size": list(preprocess.size)}
    return source_stream, description, preprocess


def _build_result(accumulator, geometry: _TargetGeometry, model_name, protocol, opts, weights_info, source_description,
                  preprocess: Preprocessing | None, input_hw, seed, elapsed, done, shard) -> ERFResult:
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
        timing={"seconds": elapsed, "images_per_second": done / elapsed if elapsed > 0 else float("nan")},
    )


def iter_results(results: ERFResult | Iterable[ERFResult]) -> list[ERFResult]:
    """Always a list, whether ``measure_erf`` returned one result or several."""
    return [results] if isinstance(results, ERFResult) else list(results)
