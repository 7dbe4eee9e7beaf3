"""Noise of the compared numbers that the AGD report gives no interval for: the ERF's centre.

The report's intervals come from a bootstrap over images; the centre gets the same treatment here, with the same
resampling (:func:`erf_tools.analysis.uncertainty.bootstrap_maps`, seeded): the centre of mass of the floor-removed
mean map of each resample. Only the interval's width is used (as a noise scale, see
:mod:`erf_tools.testing.tolerances`), so working on the stored per-image maps (block sums) needs no correction of the
position beyond mapping block centres onto input pixels. Pure NumPy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from erf_tools.analysis.maps import estimate_floor, remove_floor
from erf_tools.analysis.moments import centre_of_mass
from erf_tools.analysis.uncertainty import bootstrap_maps

__all__ = ["centre_intervals"]


def centre_intervals(result: Any, *, n_resamples: int, confidence: float = 0.95, seed: int | None = 0
                     ) -> dict[str, tuple[float, float]]:
    """95 % (``confidence``) bootstrap intervals of ``centre_y``/``centre_x`` in input pixels, or {} when the result
    has fewer than two per-image maps (then the centre has no noise estimate)."""
    stack = getattr(result, "per_image_maps", None)
    if stack is None or int(n_resamples or 0) < 1 or np.shape(stack)[0] < 2:
        return {}
    down = int(getattr(result, "per_image_downsample", 1) or 1)
    map_shape = np.shape(result.map)
    input_size = tuple(getattr(result, "input_size", None) or map_shape)
    scale = [float(n_in) / float(n_map) for n_in, n_map in zip(input_size, map_shape)]

    def statistic(mean_map: np.ndarray) -> dict[str, float]:
        positive = remove_floor(mean_map, estimate_floor(mean_map))
        if not positive.sum() > 0:
            return {"centre_y": float("nan"), "centre_x": float("nan")}
        cy, cx = centre_of_mass(positive)
        # block i of the stored maps covers map pixels [i·d, (i+1)·d); map pixel c is at (c + ½)·s − ½ input px
        return {name: ((c + 0.5) * down) * s - 0.5 for name, c, s in zip(("centre_y", "centre_x"), (cy, cx), scale)}

    boot = bootstrap_maps(stack, statistic, n_resamples=int(n_resamples), confidence=confidence, seed=seed)
    return {k: v for k, v in boot.intervals.items() if np.all(np.isfinite(v))}
