"""How results, reports and running measurements show themselves in Jupyter.

``ERFResult._repr_html_`` / ``_repr_png_`` and ``AGDReport._repr_html_`` are one-line methods that call
:func:`result_html`, :func:`result_png` and :func:`report_html` here, so that evaluating a result or a report in a
notebook cell shows a heatmap thumbnail with what the map is, or the headline numbers, instead of a dataclass dump of
arrays. :func:`notebook_progress` is a progress callback for :mod:`erf_tools.runs` that needs neither rich (the
CLI's bars) nor ipywidgets.

Thumbnails are made without a matplotlib figure: the map is block-averaged to at most :data:`THUMBNAIL_PX` pixels a
side, coloured with the default colormap on the figures' default scale (log, three decades below the maximum) and
encoded as PNG directly, which takes milliseconds even for a 1024² map. matplotlib is imported inside the functions,
because the result and report modules must stay importable without it.
"""
from __future__ import annotations

import base64
import html
import io
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from erf_tools.analysis.maps import block_reduce
from erf_tools.weights_choice import weights_label

__all__ = ["THUMBNAIL_PX", "thumbnail_rgb", "result_png", "result_html", "report_html", "notebook_progress"]

#: Largest side of a notebook thumbnail, in pixels.
THUMBNAIL_PX = 200
#: Decades below the maximum shown by a thumbnail (as the figures' default ``scale="log"``).
THUMBNAIL_DECADES = 3.0
#: Step of the plain-text progress fallback, as a fraction of the total.
PROGRESS_STEP = 0.1


# ------------------------------------------------------------------------------------------------------- thumbnails
def thumbnail_rgb(erf_map: np.ndarray, max_side: int = THUMBNAIL_PX, cmap: str = "inferno") -> np.ndarray:
    """The map as an RGB uint8 image at most ``max_side`` px a side: block means, then a log colour scale.

    Signed maps (negative values) use a symmetric linear scale on a diverging colormap instead, as the figures do.
    """
    from matplotlib import colormaps

    data = np.asarray(erf_map, dtype=np.float64)
    factor = max(1, math.ceil(max(data.shape) / max_side))
    if factor > 1:
        data = block_reduce(data, factor)  # the mean keeps the map's shape; a stride would alias thin structure
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if (data < 0).any():
        bound = float(np.abs(data).max()) or 1.0
        levels, cmap = 0.5 + 0.5 * data / bound, "RdBu_r"
    else:
        peak = float(data.max())
        floor = 10.0 ** -THUMBNAIL_DECADES  # an all-zero map is drawn at the floor colour
        levels = 1.0 + np.log10(np.maximum(data / peak if peak > 0 else data, floor)) / THUMBNAIL_DECADES
    return colormaps[cmap](np.clip(levels, 0.0, 1.0), bytes=True)[..., :3]


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image  # a dependency of matplotlib

    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def result_png(result: Any) -> bytes:
    """A PNG thumbnail of ``result.map`` (``ERFResult._repr_png_``)."""
    return _png_bytes(thumbnail_rgb(result.map))


def _img_tag(png: bytes, shape: tuple[int, int], alt: str) -> str:
    """An inline PNG; small maps are shown enlarged by a whole factor (sharp pixels) to about the thumbnail size."""
    data = base64.b64encode(png).decode("ascii")
    zoom = max(1, THUMBNAIL_PX // max(shape))
    return (f'<img src="data:image/png;base64,{data}" width="{shape[1] * zoom}" height="{shape[0] * zoom}" '
            f'alt="{html.escape(alt)}" style="image-rendering:pixelated"/>')


def _table(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th style=\"text-align:left\">{html.escape(k)}</th><td style=\"text-align:left\">"
                    f"{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def result_rows(result: Any) -> list[tuple[str, str]]:
    """What a result is, as (label, text) rows: model, target, images, input, weights, protocol."""
    images = f"{result.num_images}"
    independent = getattr(result, "num_independent_images", None)
    if independent not in (None, result.num_images):
        images += f" ({independent} independent)"
    if result.num_rejected:
        images += f", {result.num_rejected} rejected"
    return [("model", str(result.model)), ("target", str(result.target)), ("images", images),
            ("input", "×".join(str(v) for v in result.input_size) + " px"),
            ("weights", weights_label(result.weights)), ("protocol", str(result.protocol)),
            ("map", "×".join(str(v) for v in np.shape(result.map)))]


def result_html(result: Any) -> str:
    """A thumbnail beside the result's description (``ERFResult._repr_html_``)."""
    rgb = thumbnail_rgb(result.map)
    image = _img_tag(_png_bytes(rgb), rgb.shape[:2], f"ERF of {result.model} at {result.target}")
    return (f'<div style="display:flex;gap:1em;align-items:flex-start"><div>{image}</div>'
            f"<div><b>ERFResult</b>{_table(result_rows(result))}</div></div>")


# ---------------------------------------------------------------------------------------------------------- reports
def _number(value: Any, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    return f"{number:.{digits}f}" if math.isfinite(number) else "–"


def _with_interval(value: Any, interval: Any, digits: int = 3) -> str:
    text = _number(value, digits)
    if interval is not None and len(interval) == 2 and all(_number(v) != "–" for v in interval):
        text += f" [{_number(interval[0], digits)}, {_number(interval[1], digits)}]"
    return text


def report_rows(report: Any) -> list[tuple[str, str]]:
    """The headline numbers of an AGD report (an ``AGDReport`` or its ``to_dict()``) as (label, text) rows."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    intervals: Mapping[str, Any] = data.get("confidence_intervals") or {}
    spread = data.get("spread") or {}
    sigma = (f"{_with_interval(spread.get('sigma_major'), intervals.get('sigma_major'), 2)} / "
             f"{_with_interval(spread.get('sigma_minor'), intervals.get('sigma_minor'), 2)}")
    return [("AGD score", _with_interval(data.get("agd_score"), intervals.get("agd_score"))),
            ("AGD score (raw map)", _number(data.get("agd_score_raw"))),
            ("σ major / minor (px)", sigma),
            ("R²", _with_interval(data.get("r_squared"), intervals.get("r_squared"))),
            ("noise model", str(data.get("noise_model") or "–")),
            ("images", str(data.get("num_images") if data.get("num_images") is not None else "–")),
            ("flags", ", ".join(data.get("flags") or []) or "none")]


def report_html(report: Any) -> str:
    """The headline table of an AGD report (``AGDReport._repr_html_``); intervals are the bootstrap 95 % ones."""
    return f"<div><b>AGD report</b>{_table(report_rows(report))}</div>"


# --------------------------------------------------------------------------------------------------------- progress
def notebook_progress(description: str = "ERF") -> Callable[..., None]:
    """A progress callback for :func:`erf_tools.measure_erf` and :func:`erf_tools.runs.run_measure`
    (``progress(done, total)``) and :func:`erf_tools.runs.run_compare` (``progress(model, done, total)``: one bar per
    model).

    Uses tqdm's notebook bar when tqdm and ipywidgets are installed, tqdm's text bar when only tqdm is, and else
    prints a line every 10 % of the images, so a notebook never needs the CLI's rich progress or ipywidgets.

    Example
    -------
    >>> run = runs.run_measure("resnet18", progress=notebook_progress("resnet18"))   # doctest: +SKIP
    """
    bars: dict[str, Any] = {}
    make = _bar_factory()

    def update(*args: Any) -> None:
        *name, done, total = args
        label = f"{description} {name[0]}" if name else description
        if label not in bars:
            bars[label] = make(label, total)
        bars[label](done, total)

    return update


def _bar_factory() -> Callable[[str, int], Callable[[int, int], None]]:
    """The best available kind of bar: a function making one bar's ``(done, total)`` update function."""
    try:
        import ipywidgets  # noqa: F401  # tqdm's notebook bar raises without it
        from tqdm.auto import tqdm
    except ImportError:
        try:
            from tqdm.std import tqdm
        except ImportError:
            return _printed_bar
    return lambda label, total: _tqdm_bar(tqdm, label, total)


def _tqdm_bar(tqdm: Any, label: str, total: int) -> Callable[[int, int], None]:
    bar = tqdm(total=total, desc=label, unit="img")

    def update(done: int, total_now: int) -> None:
        bar.total = total_now  # "auto" image counts grow while the run converges
        bar.update(done - bar.n)
        if done >= total_now:
            bar.close()

    return update


def _printed_bar(label: str, total: int) -> Callable[[int, int], None]:
    printed = {"step": -1}

    def update(done: int, total_now: int) -> None:
        step = math.floor(done / max(total_now, 1) / PROGRESS_STEP)
        if step > printed["step"]:
            printed["step"] = step
            print(f"{label}: {done}/{total_now} images ({100 * done / max(total_now, 1):.0f} %)", file=sys.stdout,
                  flush=True)

    return update
