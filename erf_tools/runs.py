"""The command workflows: measure, analyze, compare, one function each. Usable from notebooks and scripts.

The CLI (:mod:`erf_tools.cli.app`) only parses arguments, calls one of these (or :mod:`erf_tools.catalogue` for
``erf models``) and renders what it returns; score tables are :mod:`erf_tools.tables`. Each
function writes its files atomically into an output folder and returns a small dataclass naming them.

Quick and full settings
-----------------------
The published RepLKNet protocol (1024×1024 inputs, 50 images) costs about 25 CPU-seconds per image for UniConvNet-T
even at 512 px on this project's 2-core reference machine, so the commands default to :data:`QUICK_SETTINGS`
(512 px, 32 synthetic images) whenever the protocol's own input is larger than that, and ``full_protocol=True`` restores
:data:`FULL_PROTOCOL_SETTINGS` (the preset's input size and 50 images). Every result records the size and image
count it was made with, and every figure states them.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erf_tools.catalogue import check_model_name, stage_targets
from erf_tools.engine.convergence import DEFAULT_HALF_WIDTH, DEFAULT_MAX_IMAGES
from erf_tools.engine.measure import BATCH_SIZE_MODES, MeasureConfig, measure_with_config
from erf_tools.images import IMAGE_SOURCE_NAMES
from erf_tools.protocols import PRESETS
from erf_tools.results import ERFResult, ResultFileError, atomic_write_bytes, load_result, result_paths, save_result
from erf_tools.tables import scores_table, table_format_from_suffix, write_table

__all__ = [
    "QUICK_SETTINGS", "FULL_PROTOCOL_SETTINGS", "COMMAND_BOOTSTRAP", "MeasureSettings", "MeasureRun", "AnalyzeRun",
    "CompareRun", "MeasurementInterrupted", "measure_settings", "run_measure", "run_analyze", "run_compare",
    "save_report", "load_report_dict", "saved_results_in",
]

#: Defaults of ``erf measure`` when the protocol's input is larger: 512 px (timed on UniConvNet-T, 2 cores) and 32
#: images, the count from which the noise-free AGD score is within ≈ 0.015 of its many-image value on both the trained
#: EfficientNet-Lite1 and the UniConvNet-T probe (8 images: 0.09 below and 0.05 above it; bench/RESULTS.md).
QUICK_SETTINGS = {"input_size": 512, "num_images": 32, "images": "synthetic"}
#: ``--full-protocol``: the preset's own input size and RepLKNet's 50 images.
FULL_PROTOCOL_SETTINGS = {"num_images": 50}
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
    num_images: int | str  # or "auto": until the AGD interval half-width is at most until_half_width
    images: str
    weights: str
    targets: tuple[str, ...] | None
    batch_size: int | str  # or "auto" / "max"
    device: str
    precision: str
    seed: int
    full_protocol: bool
    quick: bool  # True when the quick defaults replaced the protocol's larger input size
    weights_note: str | None = None  # why these weights, when they were chosen by default
    until_half_width: float = DEFAULT_HALF_WIDTH
    max_images: int = DEFAULT_MAX_IMAGES

    def describe(self) -> str:
        """One line for a terminal: everything the run will use."""
        size = f"{self.input_size}×{self.input_size} px" if self.input_size else "the model's native input size"
        targets = ", ".join(self.targets) if self.targets else "the family's ERF layer"
        count = (f"images until the AGD interval is ±{self.until_half_width:g} (at most {self.max_images})"
                 if self.num_images == "auto" else f"{self.num_images} images")
        text = (f"model {self.model} · protocol {self.protocol} · {size} · {count} from "
                f"{self.images} · weights {self.weights} · target {targets} · batch {self.batch_size} · "
                f"{self.device} {self.precision} · seed {self.seed}")
        if self.weights_note:
            text += f"\nweights: {self.weights_note}"
        return text

    def measure_config(self, **changes: Any) -> MeasureConfig:
        """The engine settings of this measurement (``changes``: further :class:`MeasureConfig` fields or ERF
        options, e.g. ``partial_path``, ``resume``, ``fast=True``, ``gradient="abs"``)."""
        config = MeasureConfig(
            targets=list(self.targets) if self.targets else None, protocol=self.protocol, batch_size=self.batch_size,
            device=self.device, num_images=self.num_images, weights=self.weights, seed=self.seed,
            precision=self.precision, checkpoint_every=self.batch_size if isinstance(self.batch_size, int) else 1,
            until_half_width=self.until_half_width, max_images=self.max_images,
            options={"input_size": self.input_size})
        extra = MeasureConfig.from_keywords(**changes)
        given = {name: getattr(extra, name) for name in changes if name in MeasureConfig.__dataclass_fields__}
        return config.replace(**given, options=extra.options)


def measure_settings(
    model: str,
    *,
    protocol: str = "replknet",
    input_size: int | None = None,
    num_images: int | None = None,
    images: str = QUICK_SETTINGS["images"],
    weights: str | None = "random",
    targets: Sequence[str] | None = None,
    batch_size: int | str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    full_protocol: bool = False,
    until_half_width: float = DEFAULT_HALF_WIDTH,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> MeasureSettings:
    """Resolve the input size and image count: explicit values, else full-protocol or quick defaults.

    ``num_images="auto"`` adds images until the AGD interval half-width is at most ``until_half_width`` or
    ``max_images`` are used (:class:`erf_tools.engine.convergence.ConvergenceRule`).

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
    if num_images != "auto" and (not isinstance(num_images, int) or num_images < 1):
        raise ValueError(f"the number of images must be at least 1 (or 'auto'), got {num_images!r}")
    if batch_size not in BATCH_SIZE_MODES and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"the batch size must be a positive integer, 'auto' or 'max', got {batch_size!r}")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    weights_note = None
    if weights is None or weights == "default":
        from erf_tools.weights_choice import default_weights

        decision = default_weights(model)
        weights, weights_note = decision.weights, decision.sentence
    return MeasureSettings(model=model, protocol=protocol, input_size=input_size, num_images=num_images,
                           images=str(images), weights=str(weights), targets=tuple(targets) if targets else None,
                           batch_size=batch_size, device=str(device), precision=str(precision), seed=int(seed),
                           full_protocol=bool(full_protocol), quick=quick, weights_note=weights_note,
                           until_half_width=float(until_half_width), max_images=int(max_images))


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
    images: str | Path | None = None,
    num_images: int | None = None,
    input_size: int | None = None,
    protocol: str = "replknet",
    targets: Sequence[str] | None = None,
    weights: str = "random",
    batch_size: int | str = "auto",
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

    ``images`` defaults to ``settings.images`` when ``settings`` is given, else ``QUICK_SETTINGS["images"]``.
    Parameters not listed are those of :func:`erf_tools.measure_erf` (``**options`` are ERF options such as
    ``gradient="abs"``). ``input_size``/``num_images`` default to :data:`QUICK_SETTINGS` or, with
    ``full_protocol=True``, to the protocol's own values (see :func:`measure_settings`).

    Example
    -------
    >>> run = run_measure("resnet18", input_size=64, num_images=2, out=tmp_path)   # doctest: +SKIP
    >>> run.report.agd_score                                                        # doctest: +SKIP
    """
    # the images default to those of ``settings`` (a script passing only settings measured the default otherwise)
    images = images if images is not None else (settings.images if settings is not None else QUICK_SETTINGS["images"])
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
        source = images if not isinstance(images, str) or images in IMAGE_SOURCE_NAMES else Path(images)
        measured = measure_with_config(settings.model, source,
                                       settings.measure_config(partial_path=partial, resume=resume, **options),
                                       tracked)
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


def saved_results_in(folder: str | Path) -> list[Path]:
    """The stems of every saved result in ``folder`` (``<stem>.npz`` beside ``<stem>.json``, as ``erf measure --out``
    writes them), sorted by name.

    Partial results (``*.partial.npz``, an interrupted run) and atomic-write temporaries (``.name.tmp``) are left out;
    report files (``<stem>.report.json``) have no ``.npz`` and never match. Raises :class:`ValueError` when there
    are none, because an empty comparison is always a mistake (a wrong folder, or results not yet written).
    """
    folder = Path(folder)
    stems = sorted(npz.with_suffix("") for npz in folder.glob("*.npz")
                   if not npz.name.endswith(".partial.npz") and not npz.name.startswith(".")
                   and npz.with_suffix(".json").is_file())
    if not stems:
        raise ValueError(f"the folder {str(folder)!r} holds no saved results (<stem>.npz with <stem>.json, as "
                         "`erf measure --out FOLDER` writes them)")
    return stems


def _expand_folders(sources: Sequence[str | Path | ERFResult]) -> list[str | Path | ERFResult]:
    """Each existing folder among ``sources`` replaced by the saved results in it, in place."""
    expanded: list[str | Path | ERFResult] = []
    for source in sources:
        is_folder = not isinstance(source, ERFResult) and Path(source).is_dir()
        expanded.extend(saved_results_in(source) if is_folder else [source])
    return expanded


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

    ``sources`` are saved results (paths to ``.npz``/``.json`` or their common stem), folders of saved results
    (every result in it, see :func:`saved_results_in`), loaded results, or model names; model names are measured
    first with :func:`run_measure` (``measure_options``: ``input_size``, ``num_images``, ``weights``, ``protocol``,
    ...; results saved into ``out``; ``progress(model, done, total)``, e.g.
    :func:`erf_tools.display.notebook_progress` in a notebook).

    Writes into ``out``: ``<name>.png`` (every ERF on one colour scale with one colorbar; fitted-Gaussian contours
    and r(t) squares when ``contours``/``squares``), ``<name>_radial.png`` (radial profiles on one axis) and, with
    ``stages``, ``<name>_stages.png`` (one row per model, one column per stage; model names are then measured at
    every stage, and saved results of one model with several targets form its row). ``table_format`` +
    ``table_path`` write the scores table (markdown, csv or json).
    """
    out = Path(out)
    sources = _expand_folders(sources)
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
        run.table_path = write_table(rows, table_path, table_format or table_format_from_suffix(table_path))
    return run
