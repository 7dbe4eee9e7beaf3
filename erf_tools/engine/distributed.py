"""Multi-process ERF extraction: images sharded over ranks, accumulators summed exactly, one result.

Why: a study of many models at 1024×1024 takes hours on one device. The per-image work is independent, so rank r
of w processes images r, r + w, r + 2w, ... (``measure_erf(shard=(r, w))``) and the ranks' accumulators are added
at the end. The sums are exact (:class:`erf_tools.engine.accumulate.ExactSum`: integer buckets on a fixed exponent grid), so
the all-reduce gives the very bits a single process would have produced from the same per-image maps, whatever
the number of processes; image ids, per-image maps and rejected images are put back in the single-process order.

Use it either from Python, inside an initialised process group (or under ``torchrun``, which sets the environment
this module initialises from)::

    results = measure_erf_distributed("replknet_31b", "/data/val", num_images=50, device="cuda")

or as a command (rank 0 writes the results)::

    torchrun --nproc-per-node 8 -m erf_tools.engine.distributed replknet_31b --images /data/val --num-images 50 \\
        --device cuda --batch-size auto --out results/ --checkpoint-every 8

Backends: ``nccl`` for CUDA devices, ``gloo`` for CPUs. Each rank checkpoints its own accumulators
(``<partial>.rank<r>of<w>.npz``) and resumes from them with ``resume=True``; resuming needs the same world size.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from erf_tools.engine.accumulate import ERFAccumulator, ExactSum
from erf_tools.engine.engine import PRECISIONS
from erf_tools.engine.measure import BATCH_SIZE_MODES, MeasureConfig, Measurement, run_measurement
from erf_tools.images import IMAGE_SOURCE_NAMES
from erf_tools.protocols import PRESETS
from erf_tools.results import ERFResult, save_result

__all__ = ["main", "measure_erf_distributed", "reduce_measurement", "rank_partial_path"]


def rank_partial_path(path: str | Path, rank: int, world_size: int) -> Path:
    """The checkpoint file of one rank: ``run.npz`` -> ``run.rank0of4.npz``."""
    path = Path(path)
    suffix = path.suffix or ".npz"
    return path.with_name(f"{path.stem}.rank{rank}of{world_size}{suffix}")


def _collective_device(group) -> torch.device:
    """Where tensors for collectives must live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(value: Any, group) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _all_reduce_sum(sums: ExactSum, group) -> ExactSum:
    """The exact sum over every rank of one :class:`ExactSum` (bucket by bucket: exact, integer-valued buckets)."""
    device = _collective_device(group)
    indices = sorted(set().union(*_all_gather(sums.bucket_indices(), group)))
    stacked = torch.zeros((len(indices), *sums.shape), dtype=torch.float64, device=device)
    for row, index in enumerate(indices):
        bucket = sums.bucket(index)
        if bucket is not None:
            stacked[row] = bucket.to(device)
    if indices:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return ExactSum.from_buckets(sums.shape, {index: stacked[row].cpu() for row, index in enumerate(indices)},
                                 sum(_all_gather(sums.additions, group)), sums.grid)


def _reduce_accumulator(accumulator: ERFAccumulator, rank: int, world: int, group) -> ERFAccumulator:
    """The accumulator of the whole run, identical on every rank."""
    shape = accumulator.shape
    sums = _all_reduce_sum(accumulator.sums, group)
    every_rank_has_squares = all(_all_gather(accumulator.squares is not None, group))
    squares = _all_reduce_sum(accumulator.squares, group) if every_rank_has_squares else None

    local = {
        "positions": accumulator.positions, "image_ids": accumulator.image_ids,
        "rejected_positions": accumulator.rejected_positions, "rejected": accumulator.rejected,
        "per_image": accumulator.per_image_array(), "processed": accumulator.processed,
    }
    shards = _all_gather(local, group)
    merged = ERFAccumulator(shape, accumulator.per_image_downsample, accumulator.keep_per_image)
    merged.sums, merged.squares = sums, squares
    # rank r's k-th image is image k·w + r of the run (measure_erf's shard rule)
    valid = sorted((position * world + r, r, i) for r, shard in enumerate(shards)
                   for i, position in enumerate(shard["positions"]))
    merged.image_ids = [shards[r]["image_ids"][i] for _, r, i in valid]
    merged.positions = [key for key, _, _ in valid]
    merged.count = len(valid)
    bad = sorted((position * world + r, r, i) for r, shard in enumerate(shards)
                 for i, position in enumerate(shard["rejected_positions"]))
    merged.rejected = [shards[r]["rejected"][i] for _, r, i in bad]
    merged.rejected_positions = [key for key, _, _ in bad]
    merged.processed = sum(shard["processed"] for shard in shards)
    if accumulator.keep_per_image and valid:
        merged.per_image = [np.stack([shards[r]["per_image"][i] for _, r, i in valid])]
    return merged


def reduce_measurement(measurement: Measurement, group=None) -> Measurement:
    """Combine the per-rank measurements of one sharded run into the measurement of the whole run (every rank
    gets the same one). Collective: every rank of ``group`` must call it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    geometries = _all_gather(measurement.geometry, group)
    geometry = next((g for g in geometries if g is not None), None)
    accumulators = {name: _reduce_accumulator(acc, rank, world, group)
                    for name, acc in measurement.accumulators.items()}
    done = sum(_all_gather(measurement.done, group))
    elapsed = max(_all_gather(measurement.elapsed, group))
    description = dict(measurement.source_description)
    description["num_images"] = sum(_all_gather(measurement.source_description["num_images"], group))
    engine = dict(measurement.engine) | {"world_size": world, "shard": [0, 1]}
    return Measurement(accumulators, geometry, measurement.targets, measurement.model_name, measurement.protocol,
                       measurement.options, measurement.weights_info, description, measurement.preprocess,
                       measurement.input_hw, measurement.seed, (0, 1), done, elapsed, engine,
                       measurement.partial_path)


def _init_from_environment(device: str) -> bool:
    """Initialise the default group from torchrun's environment; True if this call created it."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def measure_erf_distributed(
    model,
    images="sample",
    *,
    targets=None,
    device: str | torch.device = "cpu",
    partial_path: str | Path | None = None,
    group=None,
    **kwargs: Any,
) -> ERFResult | list[ERFResult]:
    """:func:`erf_tools.measure_erf` over every process of a ``torch.distributed`` group; same arguments.

    Each rank measures its shard (images rank, rank + world_size, ...) and the accumulators are all-reduced, so
    every rank returns the result of the whole run, identical to a single-process run on the same per-image maps.
    Without an initialised group it initialises one from torchrun's environment variables, or, outside torchrun,
    runs as a single process. ``device="cuda"`` means this rank's GPU (``LOCAL_RANK``). Checkpoints go to one file
    per rank (:func:`rank_partial_path`).
    """
    if "shard" in kwargs:
        raise TypeError("measure_erf_distributed sets shard from the process group; do not pass it")
    progress = kwargs.pop("progress", None)
    created = _init_from_environment(str(device))
    try:
        if not dist.is_initialized():
            rank, world = 0, 1
        else:
            rank, world = dist.get_rank(group), dist.get_world_size(group)
        if str(device) == "cuda" and world > 1:
            device = torch.device("cuda", torch.cuda.current_device())
        partial = rank_partial_path(partial_path, rank, world) if partial_path is not None else None
        config = MeasureConfig.from_keywords(**kwargs).replace(targets=targets, device=device, partial_path=partial,
                                                                 shard=(rank, world))
        measurement = run_measurement(model, images, config, progress)
        if world > 1:
            measurement = reduce_measurement(measurement, group)
            dist.barrier(group)
        results = measurement.results()
        if partial is not None and partial.is_file():
            partial.unlink()
        return results if isinstance(targets, (list, tuple)) else results[0]
    finally:
        if created:
            dist.destroy_process_group()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m erf_tools.engine.distributed",
        description="Measure ERFs with the images sharded over torchrun's processes; rank 0 writes the results.")
    parser.add_argument("model", help="a registered model name (timm or erf-tools)")
    parser.add_argument("--images", default="sample", help="a folder of images, 'sample' or 'noise'")
    parser.add_argument("--out", default="erf-results", help="output folder")
    parser.add_argument("--weights", default=None, help="'random', 'active', a checkpoint path, 'timm[:tag]'")
    parser.add_argument("--protocol", default="replknet", choices=list(PRESETS))
    parser.add_argument("--targets", nargs="*", default=None, help="module names or stage:N")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--batch-size", default="auto", help="an integer, 'auto' (by throughput) or 'max'")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (each rank takes its LOCAL_RANK GPU)")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--reparameterize", action="store_true")
    parser.add_argument("--fold-bn", action="store_true")
    parser.add_argument("--fft-depthwise", type=int, default=None, help="FFT for depthwise kernels >= this size")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="images between checkpoints (per rank)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchrun -m erf_tools.engine.distributed``."""
    args = _parse(argv)
    out = Path(args.out)
    options = {} if args.input_size is None else {"input_size": args.input_size}
    created = _init_from_environment(args.device)
    try:
        results = measure_erf_distributed(
            args.model, args.images if args.images in IMAGE_SOURCE_NAMES else Path(args.images),
            targets=args.targets, protocol=args.protocol, num_images=args.num_images, weights=args.weights,
            batch_size=args.batch_size if args.batch_size in BATCH_SIZE_MODES else int(args.batch_size),
            device=args.device,
            precision=args.precision, channels_last=args.channels_last, reparameterize=args.reparameterize,
            fold_bn=args.fold_bn, fft_depthwise=args.fft_depthwise, checkpoint_every=args.checkpoint_every,
            resume=args.resume, seed=args.seed, partial_path=out / f"{args.model}.partial.npz", **options)
        results = results if isinstance(results, list) else [results]
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            for result in results:
                stem = args.model if not args.targets else f"{args.model}.{result.target}"
                npz, _ = save_result(result, out / stem)
                print(f"{result.target}: {result.num_images} images -> {npz}")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
