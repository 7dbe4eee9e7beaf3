"""Score tables: the headline numbers of AGD reports as rows, and their terminal, markdown, csv and json forms."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erf_tools.results import ERFResult, atomic_write_bytes
from erf_tools.weights_choice import weights_label

__all__ = ["SCORE_COLUMNS", "TABLE_FORMATS", "format_table", "image_count_warning", "format_value", "score_row", "scores_table",
           "table_cells", "table_format_from_suffix", "write_table"]

TABLE_FORMATS = ("terminal", "markdown", "csv", "json")

#: (key, header, kind) of the score table columns, in order. kind: text, int, float3, float2, percent, ci.
SCORE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "text"),
    ("target", "target", "text"),
    ("input_size", "input (px)", "text"),
    ("num_images", "images", "int"),
    ("weights", "weights", "text"),
    ("agd_score", "AGD score", "float3"),
    ("agd_score_ci", "AGD 95% CI", "ci"),
    ("agd_score_raw", "AGD (raw map)", "float3"),
    ("sigma_major", "σ major (px)", "float1"),
    ("sigma_minor", "σ minor (px)", "float1"),
    ("r_squared", "R²", "float3"),
    ("kim_r_squared", "R² (Kim)", "float3"),
    ("beta", "β (shape)", "float2"),
    ("mardia_kurtosis", "β₂ (Mardia)", "float2"),
    ("monotonicity", "monotonicity", "float2"),
    ("r_20", "r(20%)", "percent"),
    ("r_50", "r(50%)", "percent"),
    ("r_99", "r(99%)", "percent"),
    ("effective_area_ratio", "A_eff/HW", "percent"),
    ("flags", "flags", "text"),
)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def score_row(report: Any, result: ERFResult | None = None) -> dict[str, Any]:
    """The headline numbers of one AGD report as a flat dict (NaN → None), keyed as :data:`SCORE_COLUMNS`."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    shape, spread = data.get("shape") or {}, data.get("spread") or {}
    areas = {round(float(a["threshold"]), 4): a.get("ratio") for a in data.get("area_ratios") or []}
    interval = (data.get("confidence_intervals") or {}).get("agd_score")
    effective = spread.get("effective_area_floor_removed") or spread.get("effective_area_raw") or {}
    flags = [f for f in data.get("flags") or [] if not f.startswith(("kim_fit:", "beta_fit:"))]
    row = {
        "model": result.model if result is not None else "",
        "target": result.target if result is not None else "",
        "input_size": "×".join(str(v) for v in (result.input_size if result is not None else data.get("input_size")
                                                or ())),
        "num_images": result.num_images if result is not None else data.get("num_images"),
        "weights": weights_label(result.weights) if result is not None else "",
        "agd_score": _finite(data.get("agd_score")),
        "agd_score_ci": [(_finite(v)) for v in interval] if interval else None,
        "agd_score_raw": _finite(data.get("agd_score_raw")),
        "sigma_major": _finite(spread.get("sigma_major")),
        "sigma_minor": _finite(spread.get("sigma_minor")),
        "r_squared": _finite(data.get("r_squared", (data.get("fit") or {}).get("r_squared"))),
        "kim_r_squared": _finite((data.get("kim_fit") or {}).get("r_squared")),
        "beta": _finite(shape.get("beta")),
        "mardia_kurtosis": _finite(shape.get("mardia_kurtosis")),
        "monotonicity": _finite(shape.get("monotonicity")),
        "r_20": _finite(areas.get(0.2)),
        "r_50": _finite(areas.get(0.5)),
        "r_99": _finite(areas.get(0.99)),
        "effective_area_ratio": _finite(effective.get("ratio")),
        "flags": ", ".join(flags),
    }
    return row


def scores_table(reports: Sequence[Any], results: Sequence[ERFResult] | None = None) -> list[dict[str, Any]]:
    """One :func:`score_row` per report (with model, target, input size, images and weights from ``results``)."""
    results = list(results) if results is not None else [None] * len(reports)
    if len(results) != len(reports):
        raise ValueError(f"got {len(reports)} reports for {len(results)} results")
    return [score_row(report, result) for report, result in zip(reports, results)]


def format_value(value: Any, kind: str) -> str:
    """A table cell as text (``–`` for missing values)."""
    if value is None or value == "":
        return "–"
    if kind == "ci":
        low, high = value
        return "–" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"
    if kind == "percent":
        return f"{100 * value:.2f} %"
    if kind.startswith("float"):
        return f"{value:.{int(kind[5:])}f}"
    return str(value)


def table_cells(rows: Sequence[Mapping[str, Any]], columns=SCORE_COLUMNS) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells, leaving out columns that are empty in every row."""
    used = [c for c in columns if any(row.get(c[0]) not in (None, "") for row in rows)] or list(columns[:1])
    headers = [header for _, header, _ in used]
    cells = [[format_value(row.get(key), kind) for key, _, kind in used] for row in rows]
    return headers, cells


def format_table(rows: Sequence[Mapping[str, Any]], fmt: str, columns=SCORE_COLUMNS) -> str:
    """The table as ``markdown``, ``csv`` (numbers unformatted) or ``json`` text."""
    if fmt == "json":
        return json.dumps(list(rows), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        keys = [key for key, _, _ in columns]
        keys += [k for row in rows for k in row if k not in keys]
        flat_keys = []
        for key in keys:
            flat_keys += [f"{key}_low", f"{key}_high"] if key.endswith("_ci") else [key]
        writer = csv.DictWriter(buffer, fieldnames=flat_keys, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            flat = {}
            for key in keys:
                value = row.get(key)
                if key.endswith("_ci"):
                    low, high = value if value else (None, None)
                    flat[f"{key}_low"], flat[f"{key}_high"] = low, high
                else:
                    flat[key] = value
            writer.writerow({k: "" if v is None else v for k, v in flat.items()})
        return buffer.getvalue()
    if fmt == "markdown":
        headers, cells = table_cells(rows, columns)
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    raise ValueError(f"table format {fmt!r} is not one of markdown, csv, json")


def table_format_from_suffix(path: str | Path) -> str:
    """``markdown``, ``csv`` or ``json`` from a file name's suffix."""
    suffix = Path(path).suffix.lower()
    formats = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".json": "json"}
    if suffix not in formats:
        raise ValueError(f"cannot tell the table format from {str(path)!r}; give it (markdown, csv or json)")
    return formats[suffix]


def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path, fmt: str | None = None,
                columns=SCORE_COLUMNS) -> Path:
    """Write :func:`format_table` output to ``path`` atomically (format from the suffix when not given)."""
    path = Path(path)
    fmt = fmt if fmt not in (None, "terminal") else table_format_from_suffix(path)
    text = format_table(rows, fmt, columns).encode()
    atomic_write_bytes(path, lambda handle: handle.write(text))
    return path


def image_count_warning(report: Any, result: ERFResult | None = None) -> str | None:
    """A sentence when the map rests on fewer images than it needs (None when the count was enough).

    Two checks: the convergence curve's ``images_needed`` (how many images until the map stops changing by more
    than its tolerance) against the images used, and independent source images against images (crops and flips of
    one photograph are not new information).
    """
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    used = result.num_images if result is not None else data.get("num_images")
    needed = _finite((data.get("convergence") or {}).get("images_needed"))
    problems = []
    if used and needed is not None and needed > used:
        problems.append(f"the map needs about {math.ceil(needed)} images to stop changing and has {used}")
    independent = getattr(result, "num_independent_images", None) if result is not None else None
    repeated = bool(used and independent is not None and independent < used)
    if repeated:
        problems.append(f"only {independent} of its {used} images are independent (crops and flips of the same "
                        "photographs)")
    if not problems:
        return None
    interval = (data.get("confidence_intervals") or {}).get("agd_score")
    tail = f"; its AGD interval is [{interval[0]:.3f}, {interval[1]:.3f}]" if interval and None not in interval else ""
    # more crops of the same photographs add nothing: then the remedy is independent images
    remedy = " — use --images synthetic (independent images) or a larger folder" if repeated else \
        " — add images (--num-images, --until-converged)"
    return "too few images: " + " and ".join(problems) + tail + remedy

