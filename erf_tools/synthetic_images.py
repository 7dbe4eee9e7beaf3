"""Synthetic natural-statistics images: a coloured, shaded dead-leaves model.

The dead-leaves model (Matheron 1975, "Random Sets and Integral Geometry"; Lee, Mumford & Huang 2001, "Occlusion
models for natural images: a statistical study of a scale-invariant dead leaves model", IJCV 41) stacks opaque discs,
each hiding what lies below it. With radii distributed as r^-3 between ``r_min`` and ``r_max`` the picture is scale
invariant between those scales and its power spectrum falls as 1/f², the law measured on photographs, which Ruderman
1997 ("Origins of scaling in natural images", Vision Research 37) traced to occluding objects of all sizes putting
edges at every scale.

What is added to the plain model, and why:

* colours: each leaf's colour is a Gaussian draw in RGB with the mean and covariance of the pixels of scikit-image's
  colour photographs (:data:`PHOTOGRAPH_COLOUR_MEAN`, :data:`PHOTOGRAPH_COLOUR_COV`). Its principal axes are the
  decorrelated luminance / blue–yellow / red–green axes that Ruderman, Cronin & Chiao 1998 ("Statistics of cone
  responses to natural images", JOSA A 15) found in natural scenes, with standard deviations 0.39, 0.17 and 0.04;
  draws outside the RGB cube are clipped to it;
* texture: a linear luminance gradient across each leaf (random direction, relative amplitude up to ``shading``
  between the centre and the rim), the smooth shading of curved, lit surfaces that flat discs lack.

Leaves are laid front to back (the first one drawn is on top, each new one behind those already there), an exact
sampler of the stationary picture that can stop: it stops when fewer than ``max_uncovered`` of the pixels are still
bare, and those show a background leaf (behind all others, its colour from the same model). Baradad et al. 2021 ("Learning to see by looking at noise",
NeurIPS) found dead leaves with natural colour and texture among the procedural images closest to photographs for
training networks; this module only uses the model as a test input, not for training.

The random draws are NumPy's; the painting and colouring run in a compiled kernel (``csrc/dead_leaves_cpu.cpp``,
built on first use by :mod:`erf_tools.extension_build`) that gives the NumPy painter's images bit for bit, or in NumPy
(:class:`_Canvas`, :func:`render`), the reference and the fallback. Choose with :data:`generator_backend` or
``ERF_TOOLS_DEAD_LEAVES`` (``auto``, ``compiled``, ``reference``).

``DeadLeavesModel(sampler="tiled")`` draws the same model with counter-based random numbers and paints it tile by tile
in one compiled pass (:mod:`erf_tools.synthetic_tiled`): other images, 3-4x faster.

Everything is a pure function of (seed, index, size, model): image ``index`` of ``seed`` is the same whatever else is
generated, in whatever order.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erf_tools.extension_build import BackendChoice, CppExtension, ExtensionUnavailable
from erf_tools.synthetic_tiled import tiled_dead_leaves

#: Mean RGB (0..1) of the pixels of scikit-image's colour photographs astronaut, chelsea, coffee, rocket and
#: motorcycle_left (every 7th pixel, 183 034 pixels).
PHOTOGRAPH_COLOUR_MEAN = (0.4808, 0.3605, 0.3254)
#: Their RGB covariance (same pixels); principal axes ≈ luminance (σ 0.39), blue–yellow (0.17), red–green (0.04).
PHOTOGRAPH_COLOUR_COV = (
    (0.07766, 0.05257, 0.03551),
    (0.05257, 0.05445, 0.04843),
    (0.03551, 0.04843, 0.05281),
)
#: Leaves up to this radius (px) are drawn from one table of disc offsets; larger ones one by one on their bounding
#: box. A speed trade-off only: both draw the same pixels.
STAMP_RADIUS = 32
#: The samplers of the model: NumPy's streams painted front to back in batches, or counter-based draws painted tile by
#: tile (:mod:`erf_tools.synthetic_tiled`).
SAMPLERS = ("front_to_back", "tiled")
#: ITU-R BT.601 luma weights, for the luminance statistics.
LUMA = (0.299, 0.587, 0.114)
#: Environment variable choosing the painter: ``auto`` (default), ``compiled`` or ``reference`` (NumPy).
ENV_VAR = "ERF_TOOLS_DEAD_LEAVES"


class SyntheticImageError(ValueError):
    """Bad parameters for the synthetic image model."""


class CompiledPainterUnavailable(ExtensionUnavailable):
    """The compiled dead-leaves painter could not be built or loaded (the message says why)."""


#: The compiled painter (``csrc/dead_leaves_cpu.cpp``): the same pixels as the NumPy :class:`_Canvas` and
#: :func:`render`, bit for bit; built on first use. ``-ffp-contract=off``: no fused multiply-adds, so that the
#: double disc test and the float32 colouring round as NumPy's separate operations do.
EXTENSION = CppExtension("erf_tools_dead_leaves_cpu", Path(__file__).with_name("csrc") / "dead_leaves_cpu.cpp",
                         what="the compiled dead-leaves painter", error=CompiledPainterUnavailable,
                         extra_cflags=["-ffp-contract=off"], python_module=True)
#: Which painter :func:`synthetic_image` and :func:`dead_leaves_labels` use: ``generator_backend.get()``,
#: ``.set("reference")``, ``with generator_backend.use("compiled"): ...``; else ``$ERF_TOOLS_DEAD_LEAVES``, else
#: ``auto`` (compiled if it builds, else NumPy with one warning). Both draw the same random numbers and pixels.
generator_backend = BackendChoice(ENV_VAR, "compiled", "dead-leaves generator")


def compiled_painter_available() -> bool:
    """Whether the compiled painter is built and loaded (builds it on the first call)."""
    return EXTENSION.available()


@dataclass(frozen=True)
class DeadLeavesModel:
    """Parameters of the coloured dead-leaves model; defaults give a 1/f² power spectrum (slope -2.0 to -2.1 over
    0.02-0.25 cycles/px, see tests).

    exponent: the radius density is ∝ r^-exponent on [r_min, r_max]; 3 is the scale-invariant law of Lee, Mumford &
        Huang 2001 (power spectrum 1/f²); smaller values favour large leaves (steeper spectrum), larger ones small.
    r_min: smallest radius in pixels (1.5 px: leaves of 3 pixels across, about the finest edges a pixel grid shows;
        with 2 px the spectrum steepens to a slope of about -2.4).
    r_max_fraction: largest radius as a fraction of the shorter image side (0.5: a leaf can fill the picture).
    shading: largest relative luminance change from a leaf's centre to its rim (0 = flat leaves).
    max_uncovered: stop laying leaves when fewer than this fraction of pixels is bare.
    colour_mean, colour_cov: Gaussian colour model of the leaves, RGB in 0..1.
    sampler: ``"front_to_back"`` (NumPy's random streams, painted in batches; compiled or NumPy) or ``"tiled"``
        (counter-based draws painted tile by tile, compiled only, 3-4x faster: :mod:`erf_tools.synthetic_tiled`).
        The same model, other images.
    """

    exponent: float = 3.0
    r_min: float = 1.5
    r_max_fraction: float = 0.5
    shading: float = 0.3
    max_uncovered: float = 0.005
    colour_mean: tuple[float, float, float] = PHOTOGRAPH_COLOUR_MEAN
    colour_cov: tuple[tuple[float, float, float], ...] = PHOTOGRAPH_COLOUR_COV
    sampler: str = "front_to_back"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise SyntheticImageError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not self.exponent > 1.0:
            raise SyntheticImageError(f"exponent must be > 1 (a normalisable size law), got {self.exponent}")
        if not self.r_min >= 0.5:
            raise SyntheticImageError(f"r_min must be at least 0.5 px, got {self.r_min}")
        if not 0.0 < self.r_max_fraction <= 2.0:
            raise SyntheticImageError(f"r_max_fraction must lie in (0, 2], got {self.r_max_fraction}")
        if not 0.0 <= self.shading < 1.0:
            raise SyntheticImageError(f"shading must lie in [0, 1), got {self.shading}")
        if not 0.0 < self.max_uncovered < 0.5:
            raise SyntheticImageError(f"max_uncovered must lie in (0, 0.5), got {self.max_uncovered}")
        cov = np.asarray(self.colour_cov, dtype=np.float64)
        if cov.shape != (3, 3) or not np.allclose(cov, cov.T) or np.linalg.eigvalsh(cov).min() < 0:
            raise SyntheticImageError("colour_cov must be a symmetric positive semi-definite 3×3 matrix")

    def r_max(self, height: int, width: int) -> float:
        return max(self.r_min, self.r_max_fraction * min(height, width))

    def to_dict(self) -> dict[str, Any]:
        """JSON-native (lists, not tuples), so that a description read back from a file compares equal. The default
        sampler is left out: descriptions written before there was a choice meant it."""
        return {key: np.asarray(value).tolist() if isinstance(value, tuple) else value
                for key, value in asdict(self).items() if not (key == "sampler" and value == "front_to_back")}


_DEFAULT_MODEL = DeadLeavesModel()  # validated once, not on every image


@dataclass(frozen=True)
class Leaves:
    """Leaves in front-to-back order: centres (row, column) in pixels, radii in pixels."""

    centre_y: np.ndarray
    centre_x: np.ndarray
    radius: np.ndarray


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``seed``: independent streams per (seed, index) (NumPy SeedSequence)."""
    if seed < 0 or index < 0:
        raise SyntheticImageError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([0x5D1EAF, seed, index])


def sample_radii(rng: np.random.Generator, count: int, exponent: float, r_min: float, r_max: float) -> np.ndarray:
    """``count`` radii with density ∝ r^-exponent on [r_min, r_max] (inverse transform of the CDF)."""
    u = rng.random(count)
    if r_max <= r_min:
        return np.full(count, float(r_min))
    power = 1.0 - exponent
    low, high = r_min ** power, r_max ** power
    return (low + u * (high - low)) ** (1.0 / power)


def mean_disc_area(exponent: float, r_min: float, r_max: float) -> float:
    """E[π r²] under the radius law, for the expected coverage of a batch of leaves."""
    if r_max <= r_min:
        return float(np.pi * r_min ** 2)
    return float(np.pi * _power_integral(2.0 - exponent, r_min, r_max) / _power_integral(-exponent, r_min, r_max))


def _power_integral(power: float, low: float, high: float) -> float:
    """∫ r^power dr from low to high."""
    if abs(power + 1.0) < 1e-12:
        return float(np.log(high / low))
    return float((high ** (power + 1.0) - low ** (power + 1.0)) / (power + 1.0))


def _stamp_table(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Disc offsets (dy, dx) sorted by distance, and their squared distances: the first k form a disc."""
    dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    d2 = (dy ** 2 + dx ** 2).ravel()
    order = np.argsort(d2, kind="stable")
    return np.stack([dy.ravel()[order], dx.ravel()[order]]), d2[order]


_STAMP_OFFSETS, _STAMP_D2 = _stamp_table(STAMP_RADIUS)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges 0..counts[i]-1 (int64), without a Python loop."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


class _Canvas:
    """Leaf labels on a padded canvas: the smallest (front-most) index of the leaves covering each pixel; the NumPy
    reference painter (the compiled one in ``csrc/dead_leaves_cpu.cpp`` has the same methods and pixels).

    Leaves are drawn in batches of increasing index; a pixel keeps the smallest index (scatter-min), so a batch may
    be drawn in any order. Before a batch, leaves whose bounding box meets no BLOCK×BLOCK block with a bare pixel are
    dropped: they are hidden (every pixel they could cover shows a leaf in front of them), and skipping them keeps
    the work near a few writes per pixel.
    """

    BLOCK = 4

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width, self.pad = height, width, 2 * STAMP_RADIUS + 1
        self.row = width + 2 * self.pad
        self.unset = np.iinfo(np.int32).max
        self.flat = torch.full(((height + 2 * self.pad) * self.row,), self.unset, dtype=torch.int32)
        self.offsets = (_STAMP_OFFSETS[0] * self.row + _STAMP_OFFSETS[1]).astype(np.int64)
        self.table, self.bare = self.bare_table()

    def view(self) -> torch.Tensor:
        grid = self.flat.view(self.height + 2 * self.pad, self.row)
        return grid[self.pad:self.pad + self.height, self.pad:self.pad + self.width]

    def labels(self) -> np.ndarray:
        """The labels, int32 H×W, -1 where no leaf landed."""
        labels = self.view().numpy().copy()
        labels[labels == self.unset] = -1
        return labels

    def visible(self) -> None:
        """``None``: :func:`leaf_tables` computes every leaf's row, as the reference always did (the compiled canvas
        names the leaves that show, and only their rows are computed)."""
        return None

    def bare_table(self) -> tuple[np.ndarray, int]:
        """Summed-area table of the BLOCK×BLOCK blocks holding a bare pixel, (blocks_y + 1) × (blocks_x + 1), and
        the number of bare pixels."""
        bare = (self.view() == self.unset).to(torch.float32)
        blocks = torch.nn.functional.max_pool2d(bare[None], self.BLOCK, ceil_mode=True)[0].numpy()
        table = np.zeros((blocks.shape[0] + 1, blocks.shape[1] + 1), dtype=np.int32)
        table[1:, 1:] = blocks.cumsum(axis=0).cumsum(axis=1)
        return table, int(bare.sum())

    def paint(self, centre_y: np.ndarray, centre_x: np.ndarray, r: np.ndarray, first_index: int,
              stamp_radius: float) -> int:
        """Draw leaves numbered first_index, first_index + 1, ... (leaves up to ``stamp_radius`` stamped, which
        must be :data:`STAMP_RADIUS` here); returns the number of bare pixels left."""
        if stamp_radius != STAMP_RADIUS:
            raise ValueError(f"the NumPy canvas stamps leaves up to {STAMP_RADIUS} px, not {stamp_radius}")
        table = self.table
        # Small leaves are stamped about the nearest pixel centre: their boxes are taken about that centre too.
        stamped = r <= STAMP_RADIUS
        cy = np.where(stamped, np.rint(centre_y), centre_y)
        cx = np.where(stamped, np.rint(centre_x), centre_x)
        y0 = np.clip(np.ceil(cy - r), 0, self.height).astype(np.int64)
        y1 = np.clip(np.floor(cy + r) + 1, 0, self.height).astype(np.int64)
        x0 = np.clip(np.ceil(cx - r), 0, self.width).astype(np.int64)
        x1 = np.clip(np.floor(cx + r) + 1, 0, self.width).astype(np.int64)
        b = self.BLOCK
        by0, bx0, by1, bx1 = y0 // b, x0 // b, -(-y1 // b), -(-x1 // b)
        bare_in_box = table[by1, bx1] - table[by0, bx1] - table[by1, bx0] + table[by0, bx0]
        visible = np.flatnonzero((y1 > y0) & (x1 > x0) & (bare_in_box > 0))
        small = visible[stamped[visible]]
        large = visible[~stamped[visible]]
        pixels, labels = [], []
        if len(small):
            # A disc about an integer centre holds exactly the offsets with d² <= r²: a prefix of the sorted table.
            centre = (cy[small].astype(np.int64) + self.pad) * self.row + cx[small].astype(np.int64) + self.pad
            counts = np.searchsorted(_STAMP_D2, r[small] ** 2, side="right")
            pixels.append(np.repeat(centre, counts) + self.offsets[_ragged_arange(counts)])
            labels.append(np.repeat((small + first_index).astype(np.int32), counts))
        # Large leaves one by one on their bounding box (a contiguous slice): few of them survive the culling.
        grid = self.view().numpy()  # shares memory with the label tensor
        boxes = np.stack([y0, y1, x0, x1], axis=1)[large].tolist()
        # Back to front within the batch, each keeping the smaller index, as the scatter-min does for small leaves.
        for i, (top, bottom, left, right), y, x, radius in reversed(list(zip(
                (large + first_index).tolist(), boxes, cy[large].tolist(), cx[large].tolist(), r[large].tolist()))):
            rows = (np.arange(top, bottom) - y)[:, None]
            cols = (np.arange(left, right) - x)[None, :]
            region = grid[top:bottom, left:right]
            region[(rows * rows + cols * cols <= radius * radius) & (region > i)] = i
        if pixels:
            self.flat.scatter_reduce_(0, torch.from_numpy(np.concatenate(pixels)),
                                         torch.from_numpy(np.concatenate(labels)), "amin")
        self.table, self.bare = self.bare_table()
        return self.bare

    def render(self, offset: np.ndarray, gain_y: np.ndarray, gain_x: np.ndarray, colours: np.ndarray) -> np.ndarray:
        """RGB uint8 H×W×3 from the tables of :func:`render_tables`."""
        return _colour_labels(self.labels(), offset, gain_y, gain_x, colours)


def _new_canvas(height: int, width: int) -> Any:
    """An empty canvas of the painter in force (:data:`generator_backend`)."""
    if EXTENSION.wanted(generator_backend.get(), f"using the NumPy reference painter (slower). Set {ENV_VAR}="
                        "reference to silence this.", stacklevel=3):
        return EXTENSION.load().Canvas(height, width)
    return _Canvas(height, width)


def sample_leaves(rng: np.random.Generator, height: int, width: int, model: DeadLeavesModel,
                  coverage: float) -> Leaves:
    """A Poisson batch of leaves that covers each image point ``coverage`` times on average, in random order.

    Only leaves that can reach the image are drawn: a leaf of radius r reaches it only if its centre lies within r of
    it, so the small leaves (r <= STAMP_RADIUS) fall on the image grown by STAMP_RADIUS and the large ones on the
    image grown by r_max, each class with its share of the radius law. That is the stationary process on the whole
    plane, restricted to the leaves that matter, without drawing the many small leaves far outside.
    """
    r_max = model.r_max(height, width)
    intensity = coverage / mean_disc_area(model.exponent, model.r_min, r_max)  # leaves per px²
    split = min(float(STAMP_RADIUS), r_max)
    norm = _power_integral(-model.exponent, model.r_min, r_max) if r_max > model.r_min else 1.0
    small_share = _power_integral(-model.exponent, model.r_min, split) / norm if r_max > model.r_min else 1.0
    parts = []
    for share, low, high, margin in ((small_share, model.r_min, split, split),
                                     (1.0 - small_share, split, r_max, r_max)):
        if share <= 0:
            continue
        span_y, span_x = height + 2 * margin, width + 2 * margin
        count = int(rng.poisson(intensity * share * span_y * span_x))
        parts.append((rng.random(count) * span_y - margin, rng.random(count) * span_x - margin,
                      sample_radii(rng, count, model.exponent, low, high)))
    order = rng.permutation(sum(len(p[2]) for p in parts))
    return Leaves(*(np.concatenate([p[k] for p in parts])[order] for k in range(3)))


def dead_leaves_labels(
    rng: np.random.Generator, height: int, width: int, model: DeadLeavesModel
) -> tuple[np.ndarray, Leaves]:
    """The front-most leaf of every pixel (int32 H×W, -1 where no leaf landed) and the leaves drawn, in order."""
    canvas = _new_canvas(height, width)
    leaves = _lay_leaves(rng, height, width, model, canvas)
    return canvas.labels(), leaves


def _lay_leaves(rng: np.random.Generator, height: int, width: int, model: DeadLeavesModel, canvas: Any) -> Leaves:
    """Draw batches of leaves onto ``canvas`` until fewer than ``max_uncovered`` of the pixels are bare."""
    drawn: list[Leaves] = []
    total = 0
    # The first batch covers each point twice on average (86 % of the pixels), each later one once more; coverage is
    # checked between batches.
    for attempt in range(64):
        if canvas.bare < model.max_uncovered * height * width:
            break
        leaves = sample_leaves(rng, height, width, model, 2.0 if attempt == 0 else 1.0)
        canvas.paint(leaves.centre_y, leaves.centre_x, leaves.radius, total, STAMP_RADIUS)
        drawn.append(leaves)
        total += len(leaves.radius)
    return Leaves(*(np.concatenate([getattr(b, f) for b in drawn]) for f in ("centre_y", "centre_x", "radius")))


def leaf_colours(rng: np.random.Generator, count: int, model: DeadLeavesModel) -> np.ndarray:
    """``count`` RGB colours (0..1, float32) from the Gaussian colour model, clipped to the RGB cube."""
    return _clip_colours(_colour_deviations(rng, count, model), model)


def _colour_deviations(rng: np.random.Generator, count: int, model: DeadLeavesModel) -> np.ndarray:
    cov = tuple(tuple(float(value) for value in row) for row in model.colour_cov)  # hashable even if read from JSON
    return rng.standard_normal((count, 3)) @ _colour_transform(cov).T


@functools.lru_cache(maxsize=16)
def _colour_transform(colour_cov: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """The square root of the colour covariance along its principal axes (computed once per covariance)."""
    values, vectors = np.linalg.eigh(np.asarray(colour_cov, dtype=np.float64))
    transform = vectors * np.sqrt(np.clip(values, 0.0, None))
    transform.flags.writeable = False
    return transform


def _clip_colours(deviations: np.ndarray, model: DeadLeavesModel) -> np.ndarray:
    return np.clip(np.asarray(model.colour_mean) + deviations, 0.0, 1.0).astype(np.float32)


def leaf_tables(rng: np.random.Generator, leaves: Leaves, model: DeadLeavesModel,
                shown: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw the leaves' colours and shading (in this order: colours, one more for the background, shading
    directions, amplitudes) and return the per-label float32 tables of :func:`render_tables`.

    ``shown``: indices of the leaves that show on the image; only their rows (and the background's) are computed,
    the others are 0. The random draws are the same either way, and so are the rows computed (element by element the
    same operations), so the image is too."""
    count = len(leaves.radius)
    deviations = _colour_deviations(rng, count + 1, model)
    angle = rng.random(count)
    amplitude = rng.random(count)
    if shown is None:
        colours = _clip_colours(deviations, model)
        return render_tables(leaves, colours, _shade(angle, amplitude, leaves.radius, model))
    rows = np.append(shown, count)
    subset = Leaves(leaves.centre_y[shown], leaves.centre_x[shown], leaves.radius[shown])
    tables = render_tables(subset, _clip_colours(deviations[rows], model),
                           _shade(angle[shown], amplitude[shown], subset.radius, model))
    full = [np.zeros((count + 1, *table.shape[1:]), dtype=np.float32) for table in tables]
    for whole, part in zip(full, tables):
        whole[rows] = part
    return tuple(full)


def _shade(uniform_angle: np.ndarray, uniform_amplitude: np.ndarray, radius: np.ndarray,
           model: DeadLeavesModel) -> np.ndarray:
    """Each leaf's luminance gradient (d/dy, d/dx) per pixel: a uniform direction, a relative amplitude uniform in
    [0, shading] at the rim."""
    angle = uniform_angle * 2 * np.pi
    amplitude = uniform_amplitude * model.shading / radius
    return np.stack([np.sin(angle), np.cos(angle)], axis=1) * amplitude[:, None]


def render_tables(leaves: Leaves, colours: np.ndarray,
                  shade: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-label float32 tables of :func:`render`, one row per leaf plus the background's: the gain is affine in
    (y, x) per leaf, ``offset + gain_y·y + gain_x·x`` (the background is flat), and ``colours`` is 0..255."""
    gain_y = np.append(shade[:, 0], 0.0).astype(np.float32)
    gain_x = np.append(shade[:, 1], 0.0).astype(np.float32)
    offset = np.append(1.0 - shade[:, 0] * leaves.centre_y - shade[:, 1] * leaves.centre_x, 1.0).astype(np.float32)
    return offset, gain_y, gain_x, (colours * 255.0).astype(np.float32)


def render(labels: np.ndarray, leaves: Leaves, colours: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """RGB uint8 H×W×3: each pixel the colour of its leaf times 1 + the leaf's linear shading at that pixel.

    ``colours`` has one row per leaf plus a last row for the background (label -1); ``shade`` (count×2) is each
    leaf's luminance gradient (d/dy, d/dx) per pixel, zero at the leaf's centre.
    """
    return _colour_labels(labels, *render_tables(leaves, colours, shade))


def _colour_labels(labels: np.ndarray, offset: np.ndarray, gain_y: np.ndarray, gain_x: np.ndarray,
                   colours: np.ndarray) -> np.ndarray:
    """The NumPy colouring from the tables of :func:`render_tables` (float32, in this order of operations)."""
    height, width = labels.shape
    # One index array of the platform's integer type: np.take would convert an int32 one on every call.
    index = np.where(labels < 0, len(colours) - 1, labels).astype(np.intp).reshape(height, width)
    gain = np.take(offset, index)
    term = np.take(gain_y, index)
    term *= np.arange(height, dtype=np.float32)[:, None]
    gain += term
    np.take(gain_x, index, out=term)
    term *= np.arange(width, dtype=np.float32)[None, :]
    gain += term
    rgb = np.take(colours, index, axis=0)
    rgb *= gain[..., None]
    rgb += 0.5
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


def synthetic_image(seed: int, index: int, height: int, width: int,
                    model: DeadLeavesModel | None = None) -> np.ndarray:
    """Image ``index`` of ``seed``: RGB uint8 height×width×3 from the coloured, shaded dead-leaves model.

    >>> synthetic_image(0, 3, 64, 48).shape
    (64, 48, 3)
    """
    model = model or _DEFAULT_MODEL
    if int(height) < 1 or int(width) < 1:
        raise SyntheticImageError(f"image size must be positive, got {height}×{width}")
    if seed < 0 or index < 0:
        raise SyntheticImageError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if model.sampler == "tiled":
        return tiled_dead_leaves(seed, index, int(height), int(width), **tiled_parameters(model, height, width)).image
    rng = image_rng(seed, index)
    canvas = _new_canvas(int(height), int(width))
    leaves = _lay_leaves(rng, int(height), int(width), model, canvas)
    return canvas.render(*leaf_tables(rng, leaves, model, canvas.visible()))


def tiled_parameters(model: DeadLeavesModel, height: int, width: int) -> dict[str, Any]:
    """The keyword arguments of :func:`erf_tools.synthetic_tiled.tiled_dead_leaves` for ``model`` at that size."""
    cov = tuple(tuple(float(value) for value in row) for row in model.colour_cov)
    return {"exponent": model.exponent, "r_min": model.r_min, "r_max": model.r_max(int(height), int(width)),
            "shading": model.shading, "max_uncovered": model.max_uncovered, "colour_mean": model.colour_mean,
            "colour_root": _colour_transform(cov)}


def radial_power_spectrum(luminance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of a 2-D image (mean removed, Hann window): (frequency in cycles/px, power)
    at integer radii 1 .. min(H, W)/2 - 1 of the frequency grid."""
    image = np.asarray(luminance, dtype=np.float64)
    if image.ndim != 2 or min(image.shape) < 8:
        raise SyntheticImageError(f"need a 2-D image of at least 8×8 px, got shape {image.shape}")
    height, width = image.shape
    window = np.outer(np.hanning(height), np.hanning(width))
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2((image - image.mean()) * window))) ** 2
    fy = (np.arange(height) - height // 2) / height
    fx = (np.arange(width) - width // 2) / width
    radius = np.hypot(fy[:, None], fx[None, :]) * min(height, width)
    bins = np.rint(radius).astype(np.int64)
    top = min(height, width) // 2
    power = np.bincount(bins.ravel(), spectrum.ravel(), minlength=top)[1:top] / \
        np.bincount(bins.ravel(), minlength=top)[1:top]
    return np.arange(1, top) / min(height, width), power


def spectrum_slope(frequency: np.ndarray, power: np.ndarray, band: tuple[float, float] = (0.02, 0.25)) -> float:
    """Least-squares slope of log power against log frequency within ``band`` (cycles/px); -2 for a 1/f² law."""
    keep = (frequency >= band[0]) & (frequency <= band[1]) & (power > 0)
    if keep.sum() < 3:
        raise SyntheticImageError(f"fewer than 3 frequencies in the band {band}")
    return float(np.polyfit(np.log(frequency[keep]), np.log(power[keep]), 1)[0])


def luminance(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image, in the image's units."""
    return np.asarray(image, dtype=np.float64) @ np.asarray(LUMA)


def occlusion_edge_density(labels: np.ndarray) -> float:
    """Fraction of horizontally and vertically adjacent pixel pairs that show different leaves."""
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    return float((horizontal.sum() + vertical.sum()) / (horizontal.size + vertical.size))


def expected_edge_density(model: DeadLeavesModel, height: int, width: int) -> float:
    """The dead-leaves prediction for :func:`occlusion_edge_density`: boundary length per unit area
    E[perimeter] / E[area] = 2 E[r] / E[r²] (Matheron 1975), times 2/π for pixel pairs along one axis."""
    r_max = model.r_max(height, width)
    if r_max <= model.r_min:
        mean_r, mean_r2 = model.r_min, model.r_min ** 2
    else:
        norm = _power_integral(-model.exponent, model.r_min, r_max)
        mean_r = _power_integral(1.0 - model.exponent, model.r_min, r_max) / norm
        mean_r2 = _power_integral(2.0 - model.exponent, model.r_min, r_max) / norm
    return float(2.0 * mean_r / mean_r2 * 2.0 / np.pi)
