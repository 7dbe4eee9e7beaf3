"""One function per ``erf`` command: measure, analyze, compare, models. Usable from notebooks and scripts.

The CLI (:mod:`erf_tools.cli.app`) only parses arguments, calls one of these and renders what it returns. Each
function writes its files atomically into an output folder and returns a small dataclass naming them.

Quick and full settings
-----------------------
The published RepLKNet protocol (1024×1024 inputs, 50 images) costs about 25 CPU-seconds per image for UniConvNet-T
even at 512 px on this project's 2-core reference machine, so the commands default to :data:`QUICK_SETTINGS`
(512 px, 8 images) whenever the protocol's own input is larger than that, and ``full_protocol=True`` restores
:data:`FULL_PROTOCOL_SETTINGS` (the preset's input size and 50 images). Every result records the size and image
count it was made with, and every figure states them.
"""
from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erf_tools.protocols import PRESETS
from erf_tools.results import ERFResult, ResultFileError, atomic_write_bytes, load_result, result_paths, save_result

__all__ = [
    "QUICK_SETTINGS", "FULL_PROTOCOL_SETTINGS", "TABLE_FORMATS", "MeasureSettings", "MeasureRun", "AnalyzeRun",
    "CompareRun", "MeasurementInterrupted", "measure_settings", "run_measure", "run_analyze", "run_compare",
    "models_table", "scores_table", "score_row", "format_table", "write_table", "stage_targets", "import_modules",
    "save_report", "load_report_dict",
]

#: Defaults of ``erf measure`` when the protocol's input is larger (chosen by timing UniConvNet-T on 2 cores).
QUICK_SETTINGS = {"input_size": 512, "num_images": 8}
#: ``--full-protocol``: the preset's own input size and RepLKNet's 50 images.
FULL_PROTOCOL_SETTINGS = {"num_images": 50}
TABLE_FORMATS = ("terminal", "markdown", "csv", "json")
#: Bootstrap resamples used by the commands (the library default of :func:`erf_tools.analysis.analyze` is larger).
COMMAND_BOOTSTRAP = 100


class MeasurementInterrupted(KeyboardInterrupt):
    """Ctrl-C during a measurement; the images done so far are in ``partial_path`` (resume with ``resume=True``)."""

    def __init__(self, partial_path: Path | None, done: int | None = None) -> None:
        super().__init__(str(partial_path))
        self.partial_path = partial_path
        self.done = done


# ---------------------------------------------------------------------------------------------------------- measure
@dataclass(frozen=True)
class MeasureSettings:
    """What a measurement will run with, resolved from the protocol and the quick/full defaults."""

    model: str
    protocol: str
    input_size: int | None  # None: the model's native size (timm data config)
    num_images: int
    images: str
    weights: str
    targets: tuple[str, ...] | None
    batch_size: int
    device: str
    precision: str
    seed: int
    full_protocol: bool
    quick: bool  # True when the quick defaults replaced the protocol's larger input size
    weights_note: str | None = None  # why these weights, when they were chosen by default

    def describe(self) -> str:
        """One line for a terminal: everything the run will use."""
        size = f"{self.input_size}×{self.input_size} px" if self.input_size else "the model's native input size"
        targets = ", ".join(self.targets) if self.targets else "the family's ERF layer"
        text = (f"model {self.model} · protocol {self.protocol} · {size} · {self.num_images} images from "
                f"{self.images} · weights {self.weights} · target {targets} · batch {self.batch_size} · "
                f"{self.device} {self.precision} · seed {self.seed}")
        if self.weights_note:
            text += f"\nweights: {self.weights_note}"
        return text


def measure_settings(
    model: str,
    *,
    protocol: str = "replknet",
    input_size: int | None = None,
    num_images: int | None = None,
    images: str = "sample",
    weights: str | None = "random",
    targets: Sequence[str] | None = None,
    batch_size: int = 2,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    full_protocol: bool = False,
) -> MeasureSettings:
    """Resolve the input size and image count: explicit values, else full-protocol or quick defaults.

    ``weights="default"`` (or None) is decided here (:func:`erf_tools.weights_choice.default_weights`: trained
    weights on disk or quickly downloadable, else the ``active`` probe) and the reason kept in ``weights_note``.
    """
    if protocol not in PRESETS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PRESETS)}")
    check_model_name(model)
    preset_size = PRESETS[protocol].input_size
    quick = False
    if input_size is None:
        if full_protocol or preset_size is None or preset_size <= QUICK_SETTINGS["input_size"]:
            input_size = preset_size
        else:
            input_size, quick = QUICK_SETTINGS["input_size"], True
    if num_images is None:
        num_images = FULL_PROTOCOL_SETTINGS["num_images"] if full_protocol else QUICK_SETTINGS["num_images"]
    if input_size is not None and input_size < 8:
        raise ValueError(f"input size {input_size} is too small; give at least 8 px (32 or more for most models)")
    if num_images < 1:
        raise ValueError(f"the number of images must be at least 1, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    weights_note = None
    if weights is None or weights == "default":
        from erf_tools.weights_choice import default_weights

        decision = default_weights(model)
        weights, weights_note = decision.weights, decision.sentence
    return MeasureSettings(model=model, protocol=protocol, input_size=input_size, num_images=int(num_images),
                           images=str(images), weights=str(weights), targets=tuple(targets) if targets else None,
                           batch_size=int(batch_size), device=str(device), precision=str(precision), seed=int(seed),
                           full_protocol=bool(full_protocol), quick=quick, weights_note=weights_note)


def check_model_name(model: str) -> None:
    """Raise :class:`~erf_tools.weights.UnknownModelError` (with the closest names) unless ``model`` is registered."""
    from erf_tools.weights import load_model, model_names

    if model.split(".", 1)[0] not in model_names():
        load_model(model)  # raises UnknownModelError naming the closest registered names


@dataclass
class MeasureRun:
    """What :func:`run_measure` made: results and reports (one per target) and the files written."""

    settings: MeasureSettings
    results: list[ERFResult]
    reports: list[Any]
    files: dict[str, list[Path]] = field(default_factory=dict)  # stem -> written files
    seconds: float = 0.0

    @property
    def result(self) -> ERFResult:
        return self.results[0]

    @property
    def report(self) -> Any:
        return self.reports[0]


_SLUG = re.compile(r"[^\w.\-]+")
_TARGET_SLUG = re.compile(r"[^0-9A-Za-z_+\-]+")


def output_stem(model: str, target: str | None) -> str:
    """File stem of a result: the model name, plus the target for explicit targets (``resnet18_layer3``)."""
    safe_model = _SLUG.sub("-", model)
    if target is None:
        return safe_model
    return safe_model + "_" + _TARGET_SLUG.sub("-", target).strip("-")


def partial_path_for(out: str | Path, settings: MeasureSettings) -> Path:
    """Where the resumable partial result of a measurement lives in ``out``."""
    suffix = "" if settings.targets is None else "_" + _TARGET_SLUG.sub("-", "+".join(settings.targets))
    return Path(out) / f"{output_stem(settings.model, None)}{suffix}.partial.npz"


def stage_targets(model: str) -> list[str]:
    """``stage:0`` … ``stage:N-1`` for every stage of ``model`` (read from its timm ``feature_info`` on the meta
    device, so nothing is allocated)."""
    import timm
    import torch

    from erf_tools.targets import TargetError, resolve_targets

    check_model_name(model)
    with torch.device("meta"):
        module = timm.create_model(model, pretrained=False)
    found = []
    for index in range(16):
        try:
            resolve_targets(module, f"stage:{index}")
        except TargetError:
            break
        found.append(f"stage:{index}")
    if not found:
        raise ValueError(f"{model} declares no stages (no timm feature_info); give the targets by module name")
    return found


def save_report(report: Any, path: str | Path) -> Path:
    """Write ``report.to_dict()`` as JSON atomically; return the path."""
    path = Path(path)
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False).encode()
    atomic_write_bytes(path, lambda handle: handle.write(text))
    return path


def load_report_dict(path: str | Path) -> dict[str, Any]:
    """Read a report JSON written by :func:`save_report` (as a plain dict)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ResultFileError(f"report file {str(path)!r} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{str(path)!r} is not valid JSON (truncated or corrupt)") from exc


def _analyze(result: ERFResult, bootstrap: int | None) -> Any:
    from erf_tools.analysis import analyze

    return analyze(result, bootstrap=bootstrap)


def _write_report_and_heatmap(result: ERFResult, report: Any, stem: Path, formats: Sequence[str], scale: str
                              ) -> list[Path]:
    from erf_tools.plotting import erf_figure, save_figure

    written = [save_report(report, stem.with_name(stem.name + ".report.json"))]
    written += save_figure(erf_figure(result, report, scale=scale), stem, formats)
    return written


def run_measure(
    model: str,
    *,
    images: str | Path = "sample",
    num_images: int | None = None,
    input_size: int | None = None,
    protocol: str = "replknet",
    targets: Sequence[str] | None = None,
    weights: str = "random",
    batch_size: int = 2,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    full_protocol: bool = False,
    out: str | Path = "erf-results",
    formats: Sequence[str] = ("png",),
    scale: str = "log",
    resume: bool = False,
    bootstrap: int | None = COMMAND_BOOTSTRAP,
    progress: Callable[[int, int], None] | None = None,
    settings: MeasureSettings | None = None,
    **options: Any,
) -> MeasureRun:
    """Measure, analyse and save the ERF of ``model`` (the ``erf measure`` command).

    Runs :func:`erf_tools.measure_erf` (all ``targets`` from one pass), :func:`erf_tools.analysis.analyze` on each
    result, and writes for each target ``<stem>.npz`` + ``<stem>.json`` (the result), ``<stem>.report.json`` (the AGD
    report) and ``<stem>.png`` (heatmap with the fitted Gaussian and r(t) squares; also pdf/svg if asked) into
    ``out``. The stem is the model name, with the target appended for explicit targets.

    While it runs, the accumulated maps are checkpointed after every batch to ``<out>/<model>.partial.npz``; on
    Ctrl-C the images done so far are kept there and :class:`MeasurementInterrupted` is raised. ``resume=True``
    continues from that file (same settings required) instead of starting over.

    Parameters not listed are those of :func:`erf_tools.measure_erf` (``**options`` are ERF options such as
    ``gradient="abs"``). ``input_size``/``num_images`` default to :data:`QUICK_SETTINGS` or, with
    ``full_protocol=True``, to the protocol's own values (see :func:`measure_settings`).

    Example
    -------
    >>> run = run_measure("resnet18", input_size=64, num_images=2, out=tmp_path)   # doctest: +SKIP
    >>> run.report.agd_score                                                        # doctest: +SKIP
    """
    from erf_tools.extract import measure_erf

    settings = settings or measure_settings(
        model, protocol=protocol, input_size=input_size, num_images=num_images, images=str(images), weights=weights,
        targets=targets, batch_size=batch_size, device=device, precision=precision, seed=seed,
        full_protocol=full_protocol)
    out = Path(out)
    partial = partial_path_for(out, settings)
    if resume and not partial.is_file():
        raise FileNotFoundError(
            f"there is no partial result to resume at {str(partial)!r}; run without --resume to start")
    # ``out`` is made by the first file written into it, so a run refused early (bad checkpoint) leaves no folder
    done = {"images": 0}

    def tracked(images_done: int, total: int) -> None:
        done["images"] = images_done
        if progress is not None:
            progress(images_done, total)

    started = time.perf_counter()
    try:
        measured = measure_erf(
            settings.model, images if not isinstance(images, str) or images in ("sample", "noise") else Path(images),
            targets=list(settings.targets) if settings.targets else None, protocol=settings.protocol,
            batch_size=settings.batch_size, device=settings.device, num_images=settings.num_images,
            weights=settings.weights, seed=settings.seed, precision=settings.precision, progress=tracked,
            partial_path=partial, checkpoint_every=settings.batch_size, resume=resume,
            input_size=settings.input_size, **options)
    except KeyboardInterrupt as exc:
        raise MeasurementInterrupted(partial if partial.is_file() else None, done["images"]) from exc
    results = measured if isinstance(measured, list) else [measured]
    run = MeasureRun(settings=settings, results=results, reports=[])
    stems = [out / output_stem(settings.model, settings.targets[i] if settings.targets else None)
             for i in range(len(results))]
    for result, stem in zip(results, stems):  # saved before the analysis, so an interrupted analysis loses nothing
        run.files[stem.name] = list(save_result(result, stem))
    for result, stem in zip(results, stems):
        report = _analyze(result, bootstrap)
        run.reports.append(report)
        run.files[stem.name] += _write_report_and_heatmap(result, report, stem, formats, scale)
    run.seconds = time.perf_counter() - started
    return run


# ---------------------------------------------------------------------------------------------------------- analyze
@dataclass
class AnalyzeRun:
    """What :func:`run_analyze` made."""

    result: ERFResult
    report: Any
    files: list[Path] = field(default_factory=list)


def run_analyze(
    path: str | Path,
    *,
    out: str | Path | None = None,
    bootstrap: int | None = COMMAND_BOOTSTRAP,
    figure: bool = False,
    formats: Sequence[str] = ("png",),
    scale: str = "log",
    **analysis_options: Any,
) -> AnalyzeRun:
    """Re-score a saved result (the ``erf analyze`` command): load it, analyse it, write ``<stem>.report.json``.

    ``out`` is a folder for the report (default: beside the result); ``figure=True`` also redraws the heatmap.
    ``analysis_options`` go to :func:`erf_tools.analysis.analyze` (e.g. ``floor="percentile"``).
    """
    from erf_tools.analysis import analyze

    npz_path, _ = result_paths(path)
    result = load_result(path)
    report = analyze(result, bootstrap=bootstrap, **analysis_options)
    folder = Path(out) if out is not None else npz_path.parent
    stem = folder / npz_path.with_suffix("").name
    files = [save_report(report, stem.with_name(stem.name + ".report.json"))]
    if figure:
        from erf_tools.plotting import erf_figure, save_figure

        files += save_figure(erf_figure(result, report, scale=scale), stem, formats)
    return AnalyzeRun(result=result, report=report, files=files)


# ---------------------------------------------------------------------------------------------------------- compare
@dataclass
class CompareRun:
    """What :func:`run_compare` made: the compared results, their reports, score rows and figure files."""

    results: list[ERFResult]
    reports: list[Any]
    rows: list[dict[str, Any]]
    figures: dict[str, list[Path]] = field(default_factory=dict)
    stage_results: dict[str, list[ERFResult]] = field(default_factory=dict)
    table_path: Path | None = None
    measured: list[MeasureRun] = field(default_factory=list)


def _looks_like_result(source: str | Path) -> bool:
    path = Path(source)
    npz, js = result_paths(path)
    return path.suffix in (".npz", ".json") or npz.is_file() or js.is_file() or path.is_file() or "/" in str(source)


def _stage_index(result: ERFResult) -> tuple[int, str]:
    match = re.search(r"(\d+)(?!.*\d)", result.target)
    return (int(match.group(1)) if match else 10**6, result.target)


def run_compare(
    sources: Sequence[str | Path | ERFResult],
    *,
    out: str | Path = "erf-results",
    name: str = "compare",
    scale: str = "log",
    normalise: str = "max",
    contours: bool = False,
    squares: bool = False,
    stages: bool = False,
    radial: bool = True,
    formats: Sequence[str] = ("png",),
    table_format: str | None = None,
    table_path: str | Path | None = None,
    bootstrap: int | None = COMMAND_BOOTSTRAP,
    progress: Callable[[str, int, int], None] | None = None,
    title: str = "Effective receptive fields",
    **measure_options: Any,
) -> CompareRun:
    """Compare ERFs (the ``erf compare`` command): one figure on a shared colour scale, radial profiles, scores.

    ``sources`` are saved results (paths to ``.npz``/``.json`` or their common stem), loaded results, or model
    names; model names are measured first with :func:`run_measure` (``measure_options``: ``input_size``,
    ``num_images``, ``weights``, ``protocol``, ...; results saved into ``out``; ``progress(model, done, total)``).

    Writes into ``out``: ``<name>.png`` (every ERF on one colour scale with one colorbar; fitted-Gaussian contours
    and r(t) squares when ``contours``/``squares``), ``<name>_radial.png`` (radial profiles on one axis) and, with
    ``stages``, ``<name>_stages.png`` (one row per model, one column per stage; model names are then measured at
    every stage, and saved results of one model with several targets form its row). ``table_format`` +
    ``table_path`` write the scores table (markdown, csv or json).
    """
    out = Path(out)
    sources = list(sources)
    if not sources:
        raise ValueError("nothing to compare: give saved result files or model names")
    loaded: list[ERFResult] = []
    measured: list[MeasureRun] = []
    stage_rows: dict[str, list[ERFResult]] = {}
    main: list[ERFResult] = []
    targets = measure_options.pop("targets", None)
    for source in sources:
        if isinstance(source, ERFResult):
            loaded.append(source)
        elif _looks_like_result(source):
            loaded.append(load_result(source))
        else:
            model = str(source)
            callback = None if progress is None else (lambda d, t, m=model: progress(m, d, t))
            run = run_measure(model, out=out, targets=stage_targets(model) if stages else targets,
                              progress=callback, bootstrap=bootstrap,
                              formats=formats, **measure_options)
            measured.append(run)
            if stages:
                stage_rows[model] = list(run.results)
            main.append(run.results[-1])
    # saved results: one main panel per model (its last stage), all of a model's targets as its stage row
    by_model: dict[str, list[ERFResult]] = {}
    for result in loaded:
        by_model.setdefault(result.model, []).append(result)
    for model, results in by_model.items():
        ordered = sorted(results, key=_stage_index) if len(results) > 1 else results
        if stages and len(ordered) > 1:
            stage_rows[model] = ordered
            main.append(ordered[-1])
        else:
            main.extend(results)
    order = {id(r): i for i, r in enumerate([*loaded, *(r for run in measured for r in run.results)])}
    main.sort(key=lambda r: order.get(id(r), 0))

    reports_by_id = {id(r): rep for run in measured for r, rep in zip(run.results, run.reports)}
    reports = [reports_by_id.get(id(r)) or _analyze(r, bootstrap) for r in main]

    from erf_tools.plotting import compare_figure, radial_profile_figure, save_figure, stage_grid

    figures = {"compare": save_figure(
        compare_figure(main, reports, scale=scale, normalise=normalise, contours=contours, squares=squares,
                       title=title), out / name, formats)}
    if radial:
        figures["radial"] = save_figure(radial_profile_figure(main), out / f"{name}_radial", formats)
    if stages:
        if not stage_rows:
            raise ValueError("--stages needs model names or saved results of one model at several targets")
        figures["stages"] = save_figure(stage_grid(stage_rows, scale=scale, normalise=normalise),
                                        out / f"{name}_stages", formats)
    rows = scores_table(reports, main)
    run = CompareRun(results=main, reports=reports, rows=rows, figures=figures, stage_results=stage_rows,
                     measured=measured)
    if table_path is not None:
        run.table_path = write_table(rows, table_path, table_format or _format_from_suffix(table_path))
    return run


# ----------------------------------------------------------------------------------------------------------- scores
#: (key, header, kind) of the score table columns, in order. kind: text, int, float3, float2, percent, ci.
SCORE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "text"),
    ("target", "target", "text"),
    ("input_size", "input (px)", "text"),
    ("num_images", "images", "int"),
    ("weights", "weights", "text"),
    ("agd_score", "AGD score", "float3"),
    ("agd_score_ci", "AGD 95% CI", "ci"),
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
        "weights": (result.weights or {}).get("source", "") if result is not None else "",
        "agd_score": _finite(data.get("agd_score")),
        "agd_score_ci": [(_finite(v)) for v in interval] if interval else None,
        "sigma_major": _finite(spread.get("sigma_major")),
        "sigma_minor": _finite(spread.get("sigma_minor")),
        "r_squared": _finite((data.get("fit") or {}).get("r_squared")),
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


def _format_from_suffix(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    formats = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".json": "json"}
    if suffix not in formats:
        raise ValueError(f"cannot tell the table format from {str(path)!r}; give it (markdown, csv or json)")
    return formats[suffix]


def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path, fmt: str | None = None,
                columns=SCORE_COLUMNS) -> Path:
    """Write :func:`format_table` output to ``path`` atomically (format from the suffix when not given)."""
    path = Path(path)
    fmt = fmt if fmt not in (None, "terminal") else _format_from_suffix(path)
    text = format_table(rows, fmt, columns).encode()
    atomic_write_bytes(path, lambda handle: handle.write(text))
    return path


# ----------------------------------------------------------------------------------------------------------- models
MODEL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "model", "text"),
    ("family", "family", "text"),
    ("params_m", "params (M)", "float1"),
    ("erf_layer", "default ERF layer", "text"),
    ("weights", "weights available (tag: file)", "text"),
    ("on_disk", "on disk", "text"),
)


def _family(name: str) -> str:
    import timm.models

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _is_own_model(name: str) -> bool:
    import timm.models

    return not timm.models.model_entrypoint(name).__module__.startswith("timm.")


def _weight_files(name: str) -> tuple[list[str], list[str]]:
    """``tag: file`` of every published checkpoint of ``name``, and the tags already on disk."""
    from erf_tools.pretrained import find_cached, pretrained_sources

    sources = pretrained_sources(name)
    return ([f"{s.tag}: {s.filename or '?'}" for s in sources],
            [s.tag for s in sources if find_cached(s) is not None])


def models_table(pattern: str | None = None, *, parameters: bool = True) -> list[dict[str, Any]]:
    """Registered models as rows: name, family, parameter count (millions), default ERF layer, weight files.

    Without ``pattern``, the models registered outside timm (erf-tools' families and any module imported with
    ``--import``); with a pattern (``"resnet*"``), the matching timm registry names. Parameters and the ERF layer
    are read from a model built on the meta device (no memory, no weights); ``parameters=False`` skips that.
    Weight files are the checkpoint file names of each pretrained tag (timm ``pretrained_cfg``); ``on_disk`` lists
    the tags already in the caches (``--weights pretrained:TAG`` downloads the others, see
    :mod:`erf_tools.pretrained`).
    """
    import timm
    import torch

    import erf_tools.models  # noqa: F401  (registers the project's families)
    from erf_tools.targets import TargetError, default_target

    names = timm.list_models(pattern) if pattern else [n for n in timm.list_models() if _is_own_model(n)]
    rows = []
    for name in names:
        files, on_disk = _weight_files(name)
        row: dict[str, Any] = {"name": name, "family": _family(name), "params_m": None, "erf_layer": None,
                               "weights": ", ".join(files) or "none (random / active init only)",
                               "on_disk": ", ".join(on_disk) or ("none" if files else "")}
        if parameters:
            try:
                with torch.device("meta"):
                    module = timm.create_model(name, pretrained=False)
                row["params_m"] = sum(p.numel() for p in module.parameters()) / 1e6
                try:
                    row["erf_layer"] = default_target(module)
                except TargetError:
                    row["erf_layer"] = "none declared (give --target)"
            except Exception as exc:  # noqa: BLE001 - a model that cannot be built on meta still gets listed
                row["erf_layer"] = f"not inspectable ({type(exc).__name__})"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------- imports
def import_modules(modules: Iterable[str]) -> list[str]:
    """Import user modules (dotted names or ``.py`` paths) so that their ``@register_model`` functions run.

    Raises :class:`ImportError` with one sentence naming the module when it cannot be imported.
    """
    imported = []
    for spec in modules:
        path = Path(spec)
        try:
            if spec.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise ImportError(f"module file {spec!r} does not exist")
                name = "erf_user_" + re.sub(r"\W", "_", path.stem)
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code can raise anything at import time
            raise ImportError(f"importing {spec!r} failed: {type(exc).__name__}: {exc}") from exc
        imported.append(spec)
    return imported


def result_summary(result: ERFResult) -> dict[str, Any]:
    """A few facts of a result for a terminal header (model, target, size, images, weights, timing)."""
    return {"model": result.model, "target": result.target, "protocol": result.protocol,
            "input": "×".join(map(str, result.input_size)), "images": result.num_images,
            "rejected": result.num_rejected, "weights": (result.weights or {}).get("source"),
            "seconds": (result.timing or {}).get("seconds"),
            "peak": float(np.max(result.map)) if np.size(result.map) else None}
