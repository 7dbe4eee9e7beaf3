"""``num_images="auto"``: add images until the AGD score's interval is narrow enough, or a cap is reached.

The AGD interval narrows like 1/√n. Checking after every batch would cost an analysis (with its bootstrap) per batch,
so the interval is checked at a geometric schedule, ×1.5 from :attr:`ConvergenceRule.first_check` images: the run
stops at most 50 % later than the first count that would have met the target, with about log₁.₅(n) analyses.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from erf_tools.results import ERFResult

__all__ = ["ConvergenceRule", "DEFAULT_HALF_WIDTH", "DEFAULT_MAX_IMAGES"]

#: Half-width of the 95 % AGD interval at which ``num_images="auto"`` stops.
DEFAULT_HALF_WIDTH = 0.02
#: The most images ``num_images="auto"`` uses.
DEFAULT_MAX_IMAGES = 256


@dataclass
class ConvergenceRule:
    """When to stop adding images: every target's AGD interval half-width ≤ ``half_width``, or ``max_images``."""

    half_width: float = DEFAULT_HALF_WIDTH
    max_images: int = DEFAULT_MAX_IMAGES
    first_check: int = 16
    bootstrap: int = 100
    seed: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)
    converged: bool = False
    _next: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.half_width > 0 and math.isfinite(self.half_width)):
            raise ValueError(f"the target half-width must be a positive number, got {self.half_width!r}")
        if self.max_images < 2:
            raise ValueError(f"max_images must be at least 2, got {self.max_images}")
        self._next = min(self.first_check, self.max_images)

    def should_stop(self, done: int, results: Callable[[], Sequence[ERFResult]]) -> bool:
        """Called after each batch with the images done and a function building the results so far."""
        if done < self._next:
            return False
        from erf_tools.analysis import analyze  # the engine needs the analysis only for this rule

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # interim maps: their warnings belong to the final result
            widths = []
            for result in results():
                low, high = analyze(result, bootstrap=self.bootstrap, seed=self.seed).interval("agd_score")
                widths.append((high - low) / 2 if math.isfinite(low) and math.isfinite(high) else math.inf)
        widest = max(widths)
        self.checks.append({"images": done, "half_width": widest})
        self.converged = widest <= self.half_width
        self._next = min(max(done + 1, math.ceil(done * 1.5)), self.max_images)
        return self.converged

    def record(self, done: int) -> dict[str, Any]:
        """What the result records about the rule (``timing["engine"]["until_converged"]``)."""
        return {"target_half_width": self.half_width, "max_images": self.max_images, "images": done,
                "converged": self.converged, "checks": list(self.checks)}
