"""Figures of ERF results: heatmaps, comparisons on one colour scale, radial profiles and per-stage grids.

Pure rendering: every function takes :class:`~erf_tools.results.ERFResult` objects (and optionally the
:class:`AGDReport` of :func:`erf_tools.analysis.analyze` for overlays) and returns or draws on matplotlib objects. No
pyplot state is used: figures are :class:`matplotlib.figure.Figure` objects drawn by the Agg canvas, so they work
the same in scripts, on headless machines and in notebooks (where the last expression displays them).

What is shown
-------------
Gradient magnitudes differ by orders of magnitude between models and weight sources (a random-init ResNet-101 map
peaks near 6e4, a RepLKNet-31B map near 6e-4), so maps are normalised before they share a colour scale:
``normalise="max"`` (default) shows M / max M, the relative contribution of each input pixel; ``"sum"`` shows the map
as a distribution p = M / ΣM, so a wide ERF looks dimmer than a peaked one; ``"none"`` shows raw values (only
meaningful within one model and protocol). Then ``scale`` maps values to colours:

* ``"linear"``: linear in the normalised value;
* ``"log"``: logarithmic over ``log_decades`` decades below the shared maximum (values below are drawn at the floor
  colour). This is not RepLKNet's log10(M + 1) transform, which depends on the absolute gradient magnitude
  (Ding et al. 2022, ``erf/analyze_erf.py``) and is a no-op for small values;
* ``"power"``: value^0.25, as VMamba's ERF figures (``gamma`` changes the exponent).

Every figure carries a caption line with the protocol, input size, image count and weight source of its maps
(:func:`caption`), because an ERF without them cannot be interpreted.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colors, patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse, Rectangle
from matplotlib.text import Text

from erf_tools.analysis.shape import radial_profile
from erf_tools.results import ERFResult, atomic_write_bytes
from erf_tools.weights_choice import weights_label

__all__ = [
    "score_footer",
    "SCALES", "NORMALISATIONS", "FORMATS", "caption", "describe_weights", "display_map", "colour_norm", "plot_erf",
    "erf_figure", "compare_figure", "radial_profiles", "radial_profile_figure", "stage_grid",
    "save_figure",
]

SCALES = ("linear", "log", "power")
NORMALISATIONS = ("max", "sum", "none")
FORMATS = ("png", "pdf", "svg")
DEFAULT_CMAP = "inferno"
#: σ multiples at which fitted-Gaussian ellipses are drawn.
CONTOUR_SIGMAS = (1.0, 2.0, 3.0)
# Labels sit on heatmaps whose colours span the whole colormap (a red r(99 %) label on inferno's orange was
# unreadable): a near-opaque dark box behind the text and a dark outline around each glyph keep the light label
# colours readable on any background, and the outline also separates overlay lines from bright map regions.
_LABEL_BOX = {"boxstyle": "round,pad=0.25", "facecolor": "black", "alpha": 0.72, "edgecolor": "none"}
_TEXT_OUTLINE = (patheffects.withStroke(linewidth=1.5, foreground="black"),)
_LINE_OUTLINE = (patheffects.Stroke(linewidth=2.0, foreground="black", alpha=0.6), patheffects.Normal())
_SQUARE_COLOURS = ("#4dd0e1", "#81c784", "#fff176", "#e57373", "#ba68c8")


# ----------------------------------------------------------------------------------------------------------- captions
def describe_weights(weights: Mapping[str, Any]) -> str:
    """One phrase for the weight source recorded in a result (``ERFResult.weights``)."""
    source = weights.get("source", "unknown")
    seed = weights.get("seed")
    seed_text = f", seed {seed}" if seed is not None else ""
    if source == "random":
        silenced = len(weights.get("silenced_branches") or [])
        extra = f"; {silenced} residual-branch parameters silenced" if silenced else ""
        return f"random init (family default{seed_text}{extra})"
    if source == "active":
        return f"all-branches-active random init (architecture probe{seed_text})"
    if source == "checkpoint":
        return f"checkpoint {Path(str(weights.get('path') or '?')).name}"
    if source == "timm-pretrained":
        return f"timm pretrained {weights.get('tag') or ''}".strip()
    if source == "module":
        return "weights of the given module"
    return str(source)


def _unique(values: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def caption(results: ERFResult | Sequence[ERFResult]) -> str:
    """The line every figure carries: protocol, input size, image count and image source, weights/init.

    Values shared by all results are stated once; differing ones are listed per model.
    """
    results = [results] if isinstance(results, ERFResult) else list(results)
    if not results:
        return ""

    def part(label: str, values: list[str]) -> str:
        unique = _unique(values)
        if len(unique) == 1:
            return f"{label}{unique[0]}"
        groups = [f"{v} ({', '.join(_unique([r.model for r, w in zip(results, values) if w == v]))})" for v in unique]
        return label + "; ".join(groups)

    protocols = [r.protocol for r in results]
    sizes = [f"{r.input_size[0]}×{r.input_size[1]} px" for r in results]
    images = [f"{r.num_images} {_source_name(r.image_source)} image{'s' if r.num_images != 1 else ''}"
              + (f" ({r.num_independent_images} independent)" if getattr(r, "num_independent_images", None)
                 not in (None, r.num_images) else "")
              for r in results]
    weights = [describe_weights(r.weights) for r in results]
    return " · ".join([part("protocol ", protocols), part("input ", sizes), part("", images),
                       part("weights: ", weights)])


def _source_name(source: Mapping[str, Any]) -> str:
    kind = source.get("kind", "")
    if kind == "folder":
        return f"folder {Path(str(source.get('root') or '')).name}"
    return {"sample": "sample", "noise": "noise", "tensor": "tensor"}.get(kind, str(kind))


def _title(result: ERFResult, with_target: bool = False) -> str:
    return f"{result.model}\n{result.target}" if with_target else result.model


# ------------------------------------------------------------------------------------------------- values and colour
def display_map(erf_map: np.ndarray, normalise: str = "max") -> np.ndarray:
    """The map as displayed before the colour scale: M / max M, M / ΣM or M (see the module docstring)."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise={normalise!r} is not one of {', '.join(NORMALISATIONS)}")
    array = np.asarray(erf_map, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"an ERF map must be 2-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("the ERF map holds NaN or infinite values")
    if normalise == "max":
        peak = np.abs(array).max()
        return array / peak if peak > 0 else array
    if normalise == "sum":
        total = array.sum()
        return array / total if total > 0 else array
    return array


def colour_norm(scale: str, vmax: float, *, vmin: float | None = None, log_decades: float = 3.0,
                gamma: float = 0.25) -> colors.Normalize:
    """The matplotlib norm of ``scale`` on [vmin, vmax] (vmin defaults to 0, or vmax·10^-log_decades for log)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
    if not vmax > 0:
        vmax = 1.0  # an all-zero map: any positive range draws it at the floor colour
    if scale == "log":
        low = vmin if vmin is not None and vmin > 0 else vmax * 10.0 ** (-log_decades)
        return colors.LogNorm(vmin=low, vmax=vmax, clip=True)
    if scale == "power":
        return colors.PowerNorm(gamma=gamma, vmin=vmin or 0.0, vmax=vmax, clip=True)
    return colors.Normalize(vmin=vmin or 0.0, vmax=vmax, clip=True)


def _colorbar(figure: Figure, image, ax, scale: str, normalise: str, shrink: float = 0.9) -> None:
    bar = figure.colorbar(image, ax=ax, shrink=shrink)
    bar.set_label(_colorbar_label(scale, normalise), fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _colorbar_label(scale: str, normalise: str) -> str:
    quantity = {"max": "ERF / max", "sum": "ERF / sum", "none": "ERF"}[normalise]
    return f"{quantity} ({scale} scale)"


def _prepared(erf_map: np.ndarray, scale: str, normalise: str) -> np.ndarray:
    data = display_map(erf_map, normalise)
    if scale in ("log", "power") and (data < 0).any():
        raise ValueError(f"the map has negative values (signed gradients); show it with scale='linear', not {scale!r}")
    return data


# ------------------------------------------------------------------------------------------ overlays from the report
@dataclass(frozen=True)
class _Ellipse:
    centre: tuple[float, float]  # (y, x)
    sigma_major: float
    sigma_minor: float
    theta: float  # radians, from +x towards +y
    ok: bool


@dataclass(frozen=True)
class _Square:
    threshold: float
    side: int
    centre: tuple[float, float]  # (y, x) of the centre pixel


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if not isinstance(obj, Mapping) and hasattr(obj, name):
            return getattr(obj, name)
    return default


def _fit_ellipse(report: Any) -> _Ellipse | None:
    """The full-covariance Gaussian fit of an AGD report (or a fit object itself) as an ellipse, if there is one."""
    fit = _get(report, "gaussian_fit", "fit", "gaussian", default=report)
    centre = _get(fit, "centre", "centre_yx", "center")
    major = _get(fit, "sigma_major")
    minor = _get(fit, "sigma_minor")
    if centre is None or major is None or minor is None:
        return None
    theta = float(_get(fit, "theta", "theta_rad", default=0.0))
    ok = _get(fit, "ok", default=None)
    if ok is None:
        ok = not _get(fit, "flags", default=())
    values = (float(centre[0]), float(centre[1]), float(major), float(minor))
    if not all(math.isfinite(v) for v in values) or values[2] <= 0 or values[3] <= 0:
        return None
    return _Ellipse(values[:2], values[2], values[3], theta, bool(ok))


def _area_squares(report: Any, shape: tuple[int, int]) -> list[_Square]:
    """The high-contribution squares r(t) of an AGD report: (threshold, side, centre) for every defined threshold."""
    if isinstance(report, Sequence) and not isinstance(report, (str, Mapping)):
        entries = report  # already a list of squares / dicts
        default_centre = (shape[0] // 2, shape[1] // 2)
    else:
        areas = _get(report, "area_ratios", "square_area_ratios", "area_ratio", default=None)
        if areas is None:
            return []
        default_centre = _get(areas, "centre", "centre_yx", "center", default=(shape[0] // 2, shape[1] // 2))
        entries = _get(areas, "squares", "entries", "values", default=areas)
        if isinstance(entries, Mapping):  # {threshold: side or {side: ...}}
            entries = [{"threshold": float(t), **(v if isinstance(v, Mapping) else {"side": v})}
                       for t, v in entries.items()]
    squares = []
    for entry in entries:
        if isinstance(entry, _Square):
            squares.append(entry)
            continue
        threshold = _get(entry, "threshold", "t")
        side = _get(entry, "side", "side_length")
        if threshold is None or side is None:
            continue
        centre = _get(entry, "centre", "centre_yx", "center", default=default_centre)
        squares.append(_Square(float(threshold), int(side), (float(centre[0]), float(centre[1]))))
    return squares


def _draw_ellipses(ax: Axes, ellipse: _Ellipse, *, colour: str = "white", label: bool = True) -> None:
    style = "-" if ellipse.ok else "--"
    for k in CONTOUR_SIGMAS:
        ax.add_patch(Ellipse(
            (ellipse.centre[1], ellipse.centre[0]), 2 * k * ellipse.sigma_major, 2 * k * ellipse.sigma_minor,
            angle=math.degrees(ellipse.theta), fill=False, edgecolor=colour, linestyle=style, linewidth=0.9,
            alpha=0.9, path_effects=list(_LINE_OUTLINE),
        ))
    if label:
        if ellipse.ok:
            text = f"Gaussian fit 1/2/3σ\nσ = {ellipse.sigma_major:.1f} / {ellipse.sigma_minor:.1f} px"
        else:  # agd-metrics.md §1.1: never report σ of a flagged fit as an ERF size
            text = "Gaussian fit flagged (dashed):\nσ is not an ERF size"
        _label(ax, (0.02, 0.02), text, colour, va="bottom", ha="left")


def _label(ax: Axes, where: tuple[float, float], text: str, colour: str, **alignment: Any) -> Text:
    """A small overlay label at axes fraction ``where``, readable on any map colour (dark box and outline)."""
    return ax.text(*where, text, transform=ax.transAxes, color=colour, fontsize=6, bbox=_LABEL_BOX,
                   path_effects=list(_TEXT_OUTLINE), **alignment)


def _draw_squares(ax: Axes, squares: Sequence[_Square], shape: tuple[int, int]) -> None:
    area = shape[0] * shape[1]
    for index, square in enumerate(squares):
        colour = _SQUARE_COLOURS[index % len(_SQUARE_COLOURS)]
        half = square.side / 2
        ax.add_patch(Rectangle((square.centre[1] - half, square.centre[0] - half), square.side, square.side,
                               fill=False, edgecolor=colour, linewidth=0.9, path_effects=list(_LINE_OUTLINE),
                               label=f"r({square.threshold * 100:g} %)"))
    for index, square in enumerate(squares):
        _label(ax, (0.98, 0.98 - 0.07 * index),
               f"r({square.threshold * 100:g} %) = {100 * square.side ** 2 / area:.2f} %",
               _SQUARE_COLOURS[index % len(_SQUARE_COLOURS)], va="top", ha="right")


# ------------------------------------------------------------------------------------------------------------ panels
def plot_erf(
    result: ERFResult,
    ax: Axes,
    *,
    scale: str = "log",
    normalise: str = "max",
    vmax: float | None = None,
    norm: colors.Normalize | None = None,
    cmap: str = DEFAULT_CMAP,
    gaussian_contours: Any = None,
    area_squares: Any = None,
    title: str | None = None,
    log_decades: float = 3.0,
):
    """Draw one ERF map on ``ax``; return the image artist (for a colorbar).

    Parameters
    ----------
    result: the ERF to draw (its ``map``).
    scale, normalise, log_decades: see the module docstring.
    vmax: top of the colour scale (default: the map's own maximum after normalisation); ignored when ``norm`` is
        given (a shared norm, as :func:`compare_figure` passes).
    gaussian_contours: an AGD report (or a Gaussian fit) to draw the fitted Gaussian's 1/2/3σ ellipses from; dashed
        when the fit is flagged.
    area_squares: an AGD report (or a list of squares) to draw RepLKNet's high-contribution squares r(t) from.
    title: the panel title (default: the model name).

    Example
    -------
    >>> fig = Figure(); ax = fig.add_subplot()          # doctest: +SKIP
    >>> plot_erf(result, ax, scale="log")                # doctest: +SKIP
    """
    data = _prepared(result.map, scale, normalise)
    if norm is None:
        norm = colour_norm(scale, vmax if vmax is not None else float(data.max()), log_decades=log_decades)
    if scale == "linear" and (data < 0).any():
        bound = float(np.abs(data).max()) or 1.0
        norm, cmap = colors.TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound), "RdBu_r"
    shown = np.clip(data, norm.vmin, None) if scale == "log" else data
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", origin="upper")
    height, width = data.shape
    if gaussian_contours is not None:
        ellipse = _fit_ellipse(gaussian_contours)
        if ellipse is not None:
            _draw_ellipses(ax, ellipse)
    if area_squares is not None:
        _draw_squares(ax, _area_squares(area_squares, (height, width)), (height, width))
    centre = result.receptive_field_centre
    if centre is not None:
        ax.plot([centre[1]], [centre[0]], marker="+", color="#00e5ff", markersize=6, markeredgewidth=0.8,
                path_effects=list(_LINE_OUTLINE))  # cyan alone vanishes on the bright (pale yellow) peak
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else _title(result), fontsize=9)
    return image


def _new_figure(width: float, height: float, dpi: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _reports_for(results: Sequence[ERFResult], reports: Any) -> list[Any]:
    if reports is None:
        return [None] * len(results)
    reports = list(reports)
    if len(reports) != len(results):
        raise ValueError(f"got {len(reports)} reports for {len(results)} results")
    return reports


def erf_figure(
    result: ERFResult,
    report: Any = None,
    *,
    scale: str = "log",
    normalise: str = "max",
    contours: bool = True,
    squares: bool = True,
    size: float = 4.2,
    dpi: float = 150,
    cmap: str = DEFAULT_CMAP,
) -> Figure:
    """One ERF heatmap with its colorbar and caption; with a report, the fitted Gaussian and r(t) squares on top."""
    figure = _new_figure(size, size * 1.12, dpi)
    ax = figure.add_subplot()
    image = plot_erf(result, ax, scale=scale, normalise=normalise, cmap=cmap,
                     gaussian_contours=report if contours else None, area_squares=report if squares else None,
                     title=f"{result.model} — {result.target}")
    _colorbar(figure, image, ax, scale, normalise, 0.85)
    figure.suptitle(_wrap(caption(result), 60), fontsize=7)
    if report is not None:
        figure.text(0.02, 0.01, _wrap(score_footer(report, result), 95), fontsize=5.5, va="bottom",
                    color="0.25")
    return figure


def score_footer(report: Any, result: ERFResult) -> str:
    """The figure's last line: the AGD score with its interval and image count, and a warning in words when the map
    rests on fewer images than it needs (:func:`erf_tools.tables.image_count_warning`)."""
    from erf_tools.tables import image_count_warning

    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    interval = (data.get("confidence_intervals") or {}).get("agd_score")
    score = data.get("agd_score")
    text = f"AGD score {score:.3f}" if isinstance(score, (int, float)) and np.isfinite(score) else "AGD score –"
    if interval and None not in interval:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    if isinstance(score, (int, float)) and score > 1:  # the noise-free estimate's signed root: scatter about 1
        text += " (above 1: Gaussian within the noise)"
    text += f" from {result.num_images} images"
    warning = image_count_warning(report, result)
    return text + (f" · {warning}" if warning else "")


def compare_figure(
    results: Sequence[ERFResult],
    reports: Sequence[Any] | None = None,
    *,
    scale: str = "log",
    normalise: str = "max",
    contours: bool = False,
    squares: bool = False,
    columns: int | None = None,
    panel_size: float = 2.6,
    dpi: float = 150,
    cmap: str = DEFAULT_CMAP,
    log_decades: float = 3.0,
    title: str = "Effective receptive fields",
) -> Figure:
    """Several ERFs side by side on one shared colour scale with one colorbar.

    Each map is normalised (``normalise``), then one norm spanning the largest value of all panels is used by
    every panel, so equal colours mean equal values across models. ``contours`` / ``squares`` draw the fitted
    Gaussian and r(t) squares from ``reports`` (one per result). Each panel's title names its model, AGD score and
    weights (:func:`erf_tools.weights_choice.weights_label`), so a panel cut out of the figure still says whether it
    is a trained network or a probe; the suptitle states protocol, input size, image count and weights
    (:func:`caption`).
    """
    results = list(results)
    if not results:
        raise ValueError("compare_figure needs at least one result")
    reports = _reports_for(results, reports)
    if (contours or squares) and all(r is None for r in reports):
        raise ValueError("contours and squares need the AGD reports of the results (reports=...)")
    data = [_prepared(r.map, scale, normalise) for r in results]
    norm = colour_norm(scale, max(float(d.max()) for d in data), log_decades=log_decades)
    columns = columns or min(len(results), 5)
    rows = math.ceil(len(results) / columns)
    figure = _new_figure(panel_size * columns + 0.9, panel_size * rows + 0.75, dpi)
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= len(results):
            ax.set_axis_off()
            continue
        result, report = results[index], reports[index]
        image = plot_erf(result, ax, scale=scale, normalise=normalise, norm=norm, cmap=cmap,
                         gaussian_contours=report if contours else None, area_squares=report if squares else None,
                         title=_panel_title(result, results, report))
    _colorbar(figure, image, axes, scale, normalise)
    figure.suptitle(f"{title}\n{_wrap(caption(results), int(28 * columns))}", fontsize=8)
    return figure


def _panel_title(result: ERFResult, results: Sequence[ERFResult], report: Any) -> str:
    same_model = sum(r.model == result.model for r in results) > 1
    title = _title(result, with_target=same_model)
    score = _get(report, "agd_score", default=None) if report is not None else None
    if isinstance(score, (int, float)) and math.isfinite(score):
        title += f"\nAGD score {score:.2f}" + _interval_text(report)
    return title + "\n" + _wrap_label(weights_label(result.weights))


def _interval_text(report: Any) -> str:
    """`` [lo, hi]``: the AGD score's bootstrap interval, so a panel shows how noisy its score is ("" without one)."""
    interval = (_get(report, "confidence_intervals", default=None) or {}).get("agd_score")
    if not interval or any(v is None or not math.isfinite(v) for v in interval):
        return ""
    return f" [{interval[0]:.2f}, {interval[1]:.2f}]"


def _wrap_label(label: str, width: int = 28) -> str:
    """A weights label on two lines at its parenthesis when it is wider than a panel (about ``width`` chars)."""
    head, sep, tail = label.partition(" (")
    return f"{head}\n({tail}" if sep and len(label) > width else label


def _wrap(text: str, width: int) -> str:
    """Break a caption at its ' · ' (and, inside long parts, '; ') separators to keep lines under ``width``."""
    pieces = re.split(r"( · |; )", text)
    lines, current = [], ""
    for index in range(0, len(pieces), 2):
        piece = pieces[index]
        separator = pieces[index - 1] if index else ""
        candidate = current + separator + piece
        if current and len(candidate) > width:
            lines.append(current + separator.rstrip())
            current = piece
        else:
            current = candidate
    lines.append(current)
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- radial profiles
def radial_profiles(
    results: Sequence[ERFResult],
    ax: Axes,
    *,
    centre: str = "rf",
    normalise: str = "peak",
    log: bool = True,
    bin_width: float = 1.0,
    labels: Sequence[str] | None = None,
) -> list:
    """Radial ERF profiles of several results on one axis, each about its receptive-field centre.

    Ring means over complete rings of width ``bin_width`` px (:func:`erf_tools.analysis.radial_profile`).

    centre: ``"rf"`` (the analytic receptive-field centre of the target unit, falling back to the canvas centre),
        or ``"canvas"`` ((H-1)/2, (W-1)/2).
    normalise: ``"peak"`` divides each profile by its largest ring mean (shape comparison), ``"sum"`` uses the
        sum-normalised map (ring mean of p), ``"none"`` raw values.
    Returns the line artists.
    """
    if centre not in ("rf", "canvas"):
        raise ValueError(f"centre={centre!r} must be 'rf' or 'canvas'")
    if normalise not in ("peak", "sum", "none"):
        raise ValueError(f"normalise={normalise!r} must be 'peak', 'sum' or 'none'")
    lines = []
    for index, result in enumerate(results):
        data = display_map(result.map, "sum" if normalise == "sum" else "none")
        point = result.receptive_field_centre if centre == "rf" else None
        if point is None:
            point = ((data.shape[0] - 1) / 2, (data.shape[1] - 1) / 2)
        ring = radial_profile(data, point, bin_width=bin_width)
        radii, profile = ring.radii, ring.values
        if profile.size == 0:
            continue
        if normalise == "peak" and profile.max() > 0:
            profile = profile / profile.max()
        label = labels[index] if labels is not None else result.model
        if log:
            profile = np.where(profile > 0, profile, np.nan)
        (line,) = ax.plot(radii, profile, label=label, linewidth=1.3)
        lines.append(line)
    if log:
        ax.set_yscale("log")
    where = "the receptive-field centre" if centre == "rf" else "the canvas centre"
    ax.set_xlabel(f"radius from {where} (px)")
    ax.set_ylabel({"peak": "ring mean / max ring mean", "sum": "ring mean of ERF / sum",
                   "none": "ring mean"}[normalise])
    ax.grid(True, which="major", linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=7, frameon=False)
    return lines


def radial_profile_figure(results: Sequence[ERFResult], *, width: float = 6.0, height: float = 4.0,
                          dpi: float = 150, **options: Any) -> Figure:
    """:func:`radial_profiles` in a figure of its own, with the caption line."""
    results = list(results)
    figure = _new_figure(width, height, dpi)
    ax = figure.add_subplot()
    radial_profiles(results, ax, **options)
    figure.suptitle(f"Radial ERF profiles\n{_wrap(caption(results), int(width * 13))}", fontsize=8)
    return figure


# ----------------------------------------------------------------------------------------------------- stage grids
def stage_grid(
    results_by_stage: Mapping[str, Sequence[ERFResult]] | Sequence[ERFResult],
    *,
    scale: str = "log",
    normalise: str = "max",
    panel_size: float = 2.4,
    dpi: float = 150,
    cmap: str = DEFAULT_CMAP,
    log_decades: float = 3.0,
    title: str = "ERF growth across stages",
) -> Figure:
    """A grid with one row per model and one column per stage (target), all on one shared colour scale.

    ``results_by_stage`` maps a row label (usually the model name) to its results in stage order; a plain list is
    one row. Each panel is titled with its target layer and its feature-map size.
    """
    rows = dict(results_by_stage) if isinstance(results_by_stage, Mapping) else {
        (results_by_stage[0].model if results_by_stage else ""): list(results_by_stage)}
    rows = {k: list(v) for k, v in rows.items() if len(v)}
    if not rows:
        raise ValueError("stage_grid needs at least one result")
    everything = [r for row in rows.values() for r in row]
    data = [_prepared(r.map, scale, normalise) for r in everything]
    norm = colour_norm(scale, max(float(d.max()) for d in data), log_decades=log_decades)
    columns = max(len(v) for v in rows.values())
    figure = _new_figure(panel_size * columns + 0.9, panel_size * len(rows) + 0.8, dpi)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    image = None
    for row_index, (label, row) in enumerate(rows.items()):
        for column in range(columns):
            ax = axes[row_index, column]
            if column >= len(row):
                ax.set_axis_off()
                continue
            result = row[column]
            shape = "×".join(str(s) for s in result.feature_shape[1:])
            image = plot_erf(result, ax, scale=scale, normalise=normalise, norm=norm, cmap=cmap,
                             title=f"{result.target} ({shape} units)")
            if column == 0:
                ax.set_ylabel(label, fontsize=9)
    _colorbar(figure, image, axes, scale, normalise)
    figure.suptitle(f"{title}\n{_wrap(caption(everything), int(26 * columns))}", fontsize=8)
    return figure


# ------------------------------------------------------------------------------------------------------------ saving
def save_figure(figure: Figure, path: str | Path, formats: Sequence[str] = ("png",), *, dpi: float | None = None
                ) -> list[Path]:
    """Write ``figure`` as ``<path>.<format>`` for each format (png, pdf, svg), each atomically; return the paths.

    ``path`` may carry one of the suffixes; it is replaced by each format's. The pixel size of a PNG is the figure
    size times ``dpi`` (default: the figure's dpi); no tight bounding box is used, so the size is predictable.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower().lstrip(".") in FORMATS else path
    formats = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"figure format(s) {unknown or formats} not supported; choose from {', '.join(FORMATS)}")
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    written = []
    for fmt in _unique(formats):
        target = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(target, lambda handle, fmt=fmt: figure.savefig(
            handle, format=fmt, dpi=dpi or figure.dpi, metadata=_metadata(fmt)))
        written.append(target)
    return written


def _metadata(fmt: str) -> dict[str, Any]:
    """Reproducible files: no creation dates in PDF/SVG, a stable software tag in PNG."""
    if fmt == "png":
        return {"Software": "erf-tools"}
    if fmt == "pdf":
        return {"Creator": "erf-tools", "Producer": None, "CreationDate": None}
    return {"Creator": "erf-tools", "Date": None}
