"""The tiled dead-leaves sampler: the coloured, shaded dead-leaves model of :mod:`erf_tools.synthetic_images`, drawn
with counter-based random numbers and painted tile by tile in one compiled pass (``csrc/dead_leaves_tiled_cpu.cpp``).

Chosen with ``DeadLeavesModel(sampler="tiled")``. The same model (radius law, colours, shading, coverage), but other
draws, so other images than the default ``"front_to_back"`` sampler, and four differences in the law, all below what
the model's statistics can tell apart:

* the number of leaves is fixed in advance: leaves arrive as a Poisson process in time until each point has been
  covered ``T = -ln(max_uncovered)`` times on average (so a fraction ``max_uncovered`` of the pixels is expected to be
  bare), instead of stopping once fewer than that fraction is bare;
* small leaves keep their exact centres (the front-to-back sampler rounds those of radius <= 32 px to a pixel);
* a leaf covers the pixels of its rows (``ceil(cy - r) .. floor(cy + r)``) between ``ceil(cx - h)`` and
  ``floor(cx + h)``, ``h = sqrt(r² - dy²)``, in float32, instead of the exact double disc test;
* Gaussian colours come from the normal quantile of one uniform each, shading directions from a uniform point of the
  unit disc.

Everything is a pure function of (seed, index, size, model), as for the default sampler, with no NumPy random stream
involved; the random numbers are a 64-bit hash of a key and a counter, so a leaf's colour is drawn only if it shows.
Why it is faster: see ``bench/RESULTS.md`` ("the tiled sampler").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erf_tools.extension_build import CppExtension, ExtensionUnavailable, cpu_flags, instruction_set

__all__ = ["EXTENSION", "TiledImage", "TiledSamplerUnavailable", "tiled_dead_leaves", "tiled_leaves",
           "vector_paths"]


class TiledSamplerUnavailable(ExtensionUnavailable):
    """The compiled tiled sampler could not be built or loaded (the message says why)."""


def _vector_flags() -> list[str]:
    """AVX-512 VBMI (byte permutes) and BMI2 (pdep) for the vector paths, where the CPU has them."""
    if instruction_set()[0] == "avx512" and {"avx512vbmi", "bmi2"} <= cpu_flags():
        return ["-mavx512vbmi", "-mbmi2"]
    return []


_VECTOR_FLAGS = _vector_flags()
#: The compiled sampler, built on first use. ``-ffp-contract=off``: no fused multiply-adds, so that the scalar and
#: the vector paths round alike (and as the law in the kernel's header states).
EXTENSION = CppExtension("erf_tools_dead_leaves_tiled" + ("_vbmi" if _VECTOR_FLAGS else ""),
                         Path(__file__).with_name("csrc") / "dead_leaves_tiled_cpu.cpp",
                         what="the tiled dead-leaves sampler", error=TiledSamplerUnavailable,
                         extra_cflags=["-std=c++17", "-ffp-contract=off", *_VECTOR_FLAGS], python_module=True)


@dataclass(frozen=True)
class TiledImage:
    """One image of the tiled sampler: RGB uint8 H×W×3, optionally each pixel's leaf (int32, -1: background), and
    counts: leaves drawn, leaves that show, bare (background) pixels."""

    image: np.ndarray
    labels: np.ndarray | None
    leaves: int
    visible: int
    bare: int


def tiled_dead_leaves(seed: int, index: int, height: int, width: int, *, exponent: float, r_min: float,
                      r_max: float, shading: float, max_uncovered: float, colour_mean, colour_root,
                      with_labels: bool = False) -> TiledImage:
    """Image ``index`` of ``seed`` at height×width px; ``colour_root``: a 3×3 square root of the colour covariance
    (deviation = root · z for standard normal z)."""
    image, labels, leaves, visible, bare = EXTENSION.load().generate(
        int(height), int(width), int(seed), int(index), float(exponent), float(r_min), float(r_max), float(shading),
        float(max_uncovered), np.asarray(colour_mean, dtype=np.float64), np.asarray(colour_root, dtype=np.float64),
        with_labels)
    return TiledImage(image, labels if with_labels else None, int(leaves), int(visible), int(bare))


def tiled_leaves(seed: int, index: int, height: int, width: int, *, exponent: float, r_min: float, r_max: float,
                 max_uncovered: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leaves of that image, front to back: centres (row, column) and radii in pixels (float32)."""
    return EXTENSION.load().leaves(int(height), int(width), int(seed), int(index), float(exponent), float(r_min),
                                   float(r_max), float(max_uncovered))


class vector_paths:  # noqa: N801 - used as a context manager, like a function
    """``with vector_paths(False): ...`` runs the scalar paths (the same pixels, for tests); ``available()`` says
    whether the vector paths are compiled in on this machine."""

    def __init__(self, on: bool) -> None:
        self.on, self.before = bool(on), True

    @staticmethod
    def available() -> bool:
        return bool(EXTENSION.load().vector_paths_compiled)

    def __enter__(self) -> None:
        self.before = EXTENSION.load().set_vector_paths(self.on)

    def __exit__(self, *exc: object) -> None:
        EXTENSION.load().set_vector_paths(self.before)
