"""Exact accumulation of per-image maps: :class:`ExactSum` and the per-target :class:`ERFAccumulator`.

Accumulators are exact, so neither the batch grouping, nor a resume (:mod:`.partial`), nor splitting the images over
processes (:mod:`.distributed`) changes the sum of the same per-image maps.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from erf_tools.protocols import ERFOptions

__all__ = ["FLOAT32_GRID", "MAX_EXACT_ADDITIONS", "SQUARES_GRID", "ERFAccumulator", "ExactSum", "ExponentGrid",
           "block_sum", "block_sum_torch"]


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


#: Bits of one bucket of :class:`ExactSum`: bucket j holds multiples of 2**(lowest + 30 j) below 2**(lowest + 30 (j+1)).
_BUCKET_BITS = 30
#: Additions one bucket can take and stay exact: 30-bit parts in a 53-bit float64 mantissa.
MAX_EXACT_ADDITIONS = 2 ** (53 - _BUCKET_BITS)


@dataclass(frozen=True)
class ExponentGrid:
    """The exponent grid of an :class:`ExactSum`: the lowest bucket's unit 2**lowest and the number of buckets."""

    lowest: int
    buckets: int


#: Sums of float32 maps: 2**-150 is below float32's smallest subnormal (2**-149); the top bucket, 2**120, covers its
#: largest value (< 2**128).
FLOAT32_GRID = ExponentGrid(-150, 10)
#: Sums of squared float32 maps (exact in float64: 48 significant bits): 2**-300 is below the smallest square,
#: 2**-298; the top bucket, 2**240, covers the largest, < 2**256.
SQUARES_GRID = ExponentGrid(-300, 19)


class ExactSum:
    """The exact sum of float32 maps, whatever the order or grouping of the additions.

    Why: a float64 running sum rounds differently when the same maps arrive in another order, so a run split over
    processes (:mod:`erf_tools.engine.distributed`), a resumed run or a different batch grouping would differ in the last
    bits from a single uninterrupted run. Here every value is cut along a fixed exponent grid into parts that are
    multiples of 2**e_j and smaller than 2**(e_j + 30); each bucket j sums only such parts, which float64 does
    exactly for up to 2**23 maps. Buckets therefore hold exact integers (times 2**e_j), any order of additions and
    merges gives the same buckets, and :meth:`value` (buckets added from the smallest up) is a deterministic
    function of the exact sum. Inputs of more than 24 significant bits (float64) keep their bits down to the grid's
    lowest unit (2**-150 for :data:`FLOAT32_GRID`); squared float32 maps use :data:`SQUARES_GRID`.
    """

    def __init__(self, shape: Sequence[int], grid: ExponentGrid = FLOAT32_GRID) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.grid = grid
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
        index = min((top_exponent - self.grid.lowest) // _BUCKET_BITS, self.grid.buckets - 1)
        while index > 0:
            scale = 2.0 ** (self.grid.lowest + _BUCKET_BITS * index)
            part = torch.trunc(rest / scale) * scale  # exact: power-of-two scaling and truncation
            self._bucket_add(index, part.sum(dim=0))
            rest = rest - part  # exact: |rest| < scale from here on
            index -= 1
            if not bool(rest.any()):
                return
        self._bucket_add(0, rest.sum(dim=0))

    def merge(self, other: ExactSum) -> None:
        if other.shape != self.shape or other.grid != self.grid:
            raise ValueError(f"cannot merge sums of shape {other.shape} on {other.grid} into {self.shape} on "
                             f"{self.grid}")
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

    def bucket_indices(self) -> list[int]:
        """The exponent-grid indices of the buckets in use, ascending (for collectives over ranks)."""
        return sorted(self.buckets)

    def bucket(self, index: int) -> torch.Tensor | None:
        """The float64 sum of the parts on grid index ``index`` (None where nothing was added)."""
        return self.buckets.get(index)

    @classmethod
    def from_buckets(cls, shape: Sequence[int], buckets: dict[int, torch.Tensor], additions: int,
                     grid: ExponentGrid = FLOAT32_GRID) -> ExactSum:
        """A sum made of buckets that were added elsewhere (an all-reduce over ranks): exact as long as each bucket
        holds the sum of buckets of the same index on the same grid."""
        result = cls(shape, grid)
        result.buckets = dict(buckets)
        result.additions = int(additions)
        return result

    def state(self) -> dict[str, np.ndarray]:
        indices = sorted(self.buckets)
        stacked = (np.stack([self.buckets[i].detach().cpu().numpy() for i in indices]) if indices
                   else np.zeros((0, *self.shape), dtype=np.float64))
        return {"bucket_index": np.array(indices, dtype=np.int64), "buckets": stacked,
                "additions": np.array(self.additions, dtype=np.int64),
                "grid": np.array([self.grid.lowest, self.grid.buckets], dtype=np.int64)}

    @classmethod
    def from_state(cls, shape: Sequence[int], state: dict[str, np.ndarray]) -> ExactSum:
        grid = ExponentGrid(*(int(v) for v in state["grid"])) if "grid" in state else FLOAT32_GRID
        result = cls(shape, grid)
        for index, values in zip(state["bucket_index"].tolist(), state["buckets"]):
            result.buckets[int(index)] = torch.from_numpy(np.array(values, dtype=np.float64))
        result.additions = int(state["additions"])
        return result


def block_sum_torch(maps: torch.Tensor, factor: int) -> torch.Tensor:
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
    """Exact running sums (:class:`ExactSum`) of the valid per-image maps of one target and of their squares, with
    the bookkeeping a result needs. ``total`` is the float64 value of the sum.

    The sum of squares gives every pixel's sample variance over images, hence the standard error of the map at full
    resolution whatever the number of images (:meth:`standard_error`), as exactly as the map itself: independent of
    batching, workers, resume and sharding. ``squares`` is None for a checkpoint written before it existed.
    """

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
    squares: ExactSum | None = field(init=False)

    def __post_init__(self) -> None:
        self.sums = ExactSum(self.shape)
        self.squares = ExactSum(self.shape, SQUARES_GRID)

    @property
    def total(self) -> np.ndarray:
        return self.sums.value()

    @total.setter
    def total(self, value: np.ndarray) -> None:
        self.sums = ExactSum(self.shape)
        self.sums.add(torch.as_tensor(np.asarray(value, dtype=np.float64))[None])
        self.squares = None  # a bare total carries no per-image spread

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
        if self.squares is not None:
            self.squares.add(valid.to(torch.float64).square())  # exact: a float32 squared fits float64
        if self.keep_per_image and len(valid):
            self.per_image.append(
                block_sum_torch(valid, self.per_image_downsample).to("cpu", torch.float32).numpy())

    def merge(self, other: ERFAccumulator) -> None:
        """Fold another accumulator of the same target in (shards of a distributed run, resumed runs): exact."""
        self.sums.merge(other.sums)
        if self.squares is not None and other.squares is not None:
            self.squares.merge(other.squares)
        else:
            self.squares = None
        self.count += other.count
        self.image_ids += other.image_ids
        self.rejected += other.rejected
        self.per_image += other.per_image
        self.positions += [self.processed + p for p in other.positions]
        self.rejected_positions += [self.processed + p for p in other.rejected_positions]
        self.processed += other.processed

    def _scale(self, options: ERFOptions, total: np.ndarray) -> float:
        """The factor that turns the exact sum into the protocol's map: 1/n for a mean, then the normalisation."""
        scale = 1.0 / self.count if options.image_reduction == "mean" and self.count else 1.0
        if options.normalisation in ("sum", "max"):
            reduced = scale * (total.sum() if options.normalisation == "sum" else total.max())
            scale = scale / reduced if reduced > 0 else 0.0
        return scale

    def finalize(self, options: ERFOptions) -> np.ndarray:
        """The protocol's map: mean or sum over valid images, then the normalisation."""
        total = self.total
        if options.image_reduction == "mean" and self.count:
            total /= self.count
        if options.normalisation == "sum":
            reduced = total.sum()
            return total / reduced if reduced > 0 else np.zeros_like(total)
        if options.normalisation == "max":
            peak = total.max()
            return total / peak if peak > 0 else np.zeros_like(total)
        return total

    def pixel_variance(self) -> np.ndarray | None:
        """The sample variance over valid images of each pixel of the per-image maps (None below 2 images or for a
        checkpoint without squares)."""
        if self.squares is None or self.count < 2:
            return None
        total = self.total
        variance = (self.squares.value() - total * total / self.count) / (self.count - 1)
        return np.maximum(variance, 0.0)  # rounding of the difference can leave -1e-16 where all images agree

    def standard_error(self, options: ERFOptions, independent: int | None = None) -> np.ndarray | None:
        """The standard error of each pixel of :meth:`finalize`'s map, in its units.

        ``independent``: the number of independent source images among the valid ones (crops of one photograph
        count once). Fewer independent images than images make the error larger: the per-image variance is divided
        by the independent count, the conservative limit of fully correlated repeats. The normalising constant of
        ``normalisation="sum"``/``"max"`` is taken as fixed (its relative error is that of a sum over every pixel).
        """
        variance = self.pixel_variance()
        if variance is None:
            return None
        effective = min(self.count, independent) if independent else self.count
        total = self.total
        # the map is total × scale; the exact sum over n images has the standard error n·√(variance / effective)
        return self.count * np.sqrt(variance / effective) * self._scale(options, total)

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
        } | {f"sum.{k}": v for k, v in self.sums.state().items()} | (
            {} if self.squares is None else {f"sq.{k}": v for k, v in self.squares.state().items()})

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "sum.buckets" in state:
            self.sums = ExactSum.from_state(self.shape, {k[4:]: v for k, v in state.items() if k.startswith("sum.")})
        else:  # a checkpoint written before the exact sum: its float64 total
            self.total = state["total"]
        squares = {k[3:]: v for k, v in state.items() if k.startswith("sq.")}
        self.squares = ExactSum.from_state(self.shape, squares) if squares else None
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
