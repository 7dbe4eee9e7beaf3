"""``batch_size="auto"``: the batch size chosen by measured throughput, within what fits in memory.

Why measure: the largest batch that fits is not the fastest one. On a 2-core CPU ResNet-50 at 224 ran at 1.19×
OpenERF's images/s at batch 8 and 0.97× at batch 16 (``bench/RESULTS.md``), and UniConvNet-T at 1024 gains nothing
beyond batch 1 while it needs 4.6 GiB per image; on a GPU throughput grows up to a few dozen images. No formula
predicts where the curve turns, so the first batches of the run try sizes 1, 2, 4, ... (each one real work: the
maps do not depend on the batch size beyond float rounding) and the run continues with the smallest batch about
as fast as the fastest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AUTO_MEMORY_SHARE", "SLOWDOWN", "TIE", "ThroughputTuner"]

#: larger batches are tried until one is this much slower per image than the best so far. Why not stop at the first
#: batch that is not faster: per-image times of single batches scatter by ±10-20 % on a shared machine, and on CPUs
#: the curve is often flat from 1 to 4 images and falls after (ResNet-50 @224, 2 cores: 0.28, 0.27, 0.28, then
#: 0.25 s per image at 8), so a first tie says nothing about larger batches.
SLOWDOWN = 0.10
#: the run continues with the smallest batch within this much of the fastest per image: the same speed for less
#: memory (UniConvNet-T @512, 2 cores: 1.82, 1.69, 1.77 s per image at 4, 8, 16 images of 1.15 GiB each)
TIE = 0.05
#: ``"auto"`` tries batches up to what fits in this share of the free memory (``"max"`` uses all of it, less
#: headroom): a throughput search should not take the machine's memory from everything else
AUTO_MEMORY_SHARE = 0.5


@dataclass
class ThroughputTuner:
    """Batch sizes for one run: a probe batch of 1 (it also runs the one-off first-batch probes, so its time is
    not compared), then trials of 1, 2, 4, ... up to ``cap`` until one is :data:`SLOWDOWN` slower per image than
    the best so far; then, for the rest of the run, the smallest size within :data:`TIE` of the fastest.

    ``next_size`` may be called ahead of ``record`` (a prefetch thread builds batches in advance): trials already
    handed out are still timed, and the best of all recorded trials wins.
    """

    cap: int
    slowdown: float = SLOWDOWN
    #: seconds per image of each timed trial size
    trials: dict[int, float] = field(default_factory=dict)
    issued: list[int] = field(default_factory=list)
    stopped: bool = False

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ValueError(f"the batch-size cap must be at least 1, got {self.cap}")

    def _schedule(self) -> list[int]:
        sizes, size = [1], 1
        while size < self.cap:
            size = min(2 * size, self.cap)
            sizes.append(size)
        return sizes

    @property
    def best(self) -> int:
        """The smallest size within :data:`TIE` of the fastest measured so far (1 before any trial)."""
        if not self.trials:
            return 1
        fastest = min(self.trials.values())
        return min(size for size, per_image in self.trials.items() if per_image <= (1 + TIE) * fastest)

    def next_size(self) -> int:
        """The size of the next batch."""
        if not self.issued:
            size = 1  # probe batch
        else:
            pending = [s for s in self._schedule() if s not in self.issued[1:]]
            size = pending[0] if pending and not self.stopped else self.best
        self.issued.append(size)
        return size

    def record(self, batch_index: int, images: int, seconds: float) -> None:
        """The wall time of batch ``batch_index`` (0-based, in issue order) holding ``images`` images."""
        if batch_index == 0 or batch_index >= len(self.issued) or images != self.issued[batch_index]:
            return  # the probe batch, or a short last batch
        if images in self.trials:
            return  # settled batches, or a trial size repeated while its time was pending
        per_image = seconds / images
        best_before = min(self.trials.values()) if self.trials else None
        self.trials[images] = per_image
        if best_before is not None and per_image > (1 + self.slowdown) * best_before:
            self.stopped = True
        if images >= self.cap:
            self.stopped = True

    def to_dict(self) -> dict[str, Any]:
        """What the tuning measured, for the result's timing record."""
        return {"cap": self.cap, "chosen": self.best,
                "seconds_per_image": {str(k): round(v, 6) for k, v in sorted(self.trials.items())}}
