"""The ``erf`` command: measure, compare, analyze and list models. Parsing and rendering only.

Every command calls one function of :mod:`erf_tools.runs` (or :mod:`erf_tools.catalogue`) and renders what it returns. Exit codes: 0 success,
2 bad usage or input (unknown model, missing images, bad checkpoint, unreadable result, bad option), 1 a failure while
running, 130 Ctrl-C (a measurement keeps its partial result; rerun with ``--resume``). Expected errors print one
sentence, never a traceback (``--debug`` shows it).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from erf_tools import catalogue, runs, tables
from erf_tools.cli import render
from erf_tools.engine.convergence import DEFAULT_HALF_WIDTH, DEFAULT_MAX_IMAGES
from erf_tools.engine.engine import PRECISIONS
from erf_tools.engine.measure import BATCH_SIZE_MODES
from erf_tools.images import ImageSourceError
from erf_tools.plotting import NORMALISATIONS, SCALES
from erf_tools.protocols import PRESETS
from erf_tools.results import ResultFileError
from erf_tools.targets import TargetError
from erf_tools.weights import CheckpointError, UnknownModelError

app = typer.Typer(
    name="erf",
    help="Measure, score and compare effective receptive fields (ERFs) of vision backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

USAGE_ERRORS = (UnknownModelError, ImageSourceError, CheckpointError, ResultFileError, TargetError, ImportError,
                FileNotFoundError, ValueError, TypeError)


def _choices(name: str, values) -> type[Enum]:
    """A typer choice type built from one of the library's own tuples of names (never repeated here)."""
    return Enum(name, {value: value for value in values}, type=str)


Protocol = _choices("Protocol", PRESETS)
Precision = _choices("Precision", PRECISIONS)
Scale = _choices("Scale", SCALES)
Normalise = _choices("Normalise", NORMALISATIONS)
TableFormat = _choices("TableFormat", tables.TABLE_FORMATS)


def _batch_size(value: str) -> int | str:
    """``--batch-size``: a positive integer, ``auto`` (by measured throughput) or ``max`` (the largest that fits)."""
    if value in BATCH_SIZE_MODES:
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise typer.BadParameter(f"{value!r}: give a positive integer, 'auto' or 'max'", param_hint="--batch-size")
    return size


@contextmanager
def _errors() -> Iterator[None]:
    """Map exceptions to one error line and an exit code."""
    try:
        with render.rich_warnings():
            yield
    except typer.Exit:
        raise
    except runs.MeasurementInterrupted as exc:
        if exc.partial_path is not None:
            render.error(f"interrupted after {exc.done} images; the partial result is saved in {exc.partial_path}: "
                         "rerun the same command with --resume to continue")
        else:
            render.error("interrupted before the first batch finished; nothing was saved")
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        render.error("interrupted")
        raise typer.Exit(130) from None
    except USAGE_ERRORS as exc:
        if _state["debug"]:
            if getattr(exc, "details", None):  # e.g. the full key lists of a refused checkpoint
                render.errors.print(exc.details, markup=False, soft_wrap=True)
            raise
        render.error(_sentence(exc))
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one sentence, exit 1
        if _state["debug"]:
            raise
        render.error(f"{type(exc).__name__}: {_sentence(exc)} (rerun with --debug for the traceback)")
        raise typer.Exit(1) from None


def _sentence(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return text


def _formats(value: str) -> list[str]:
    formats = [f.strip().lower().lstrip(".") for f in value.split(",") if f.strip()]
    unknown = [f for f in formats if f not in ("png", "pdf", "svg")]
    if unknown or not formats:
        raise typer.BadParameter(f"{value!r}: give a comma-separated list of png, pdf, svg", param_hint="--format")
    return formats


def _options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` ERF options (values read as JSON when possible: ``channels=[0,1]``, ``centre=[3,3]``)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _targets(target: list[str], stage: list[int], stages: bool, model: str) -> list[str] | None:
    chosen = list(target) + [f"stage:{s}" for s in stage]
    if stages:
        chosen += [t for t in catalogue.stage_targets(model) if t not in chosen]
    return chosen or None


@app.callback()
def main_options(
    import_: Annotated[Optional[list[str]], typer.Option(
        "--import", help="Import MODULE (dotted name or .py file) first, to register your own timm models.",
        metavar="MODULE")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
) -> None:
    """Measure, score and compare effective receptive fields (ERFs) of vision backbones."""
    _state["debug"] = debug
    if import_:
        with _errors():
            catalogue.import_modules(import_)


# ---------------------------------------------------------------------------------------------------------- measure
Model = Annotated[str, typer.Option("--model", "-m", help="Registered model name (see `erf models`).")]
Images = Annotated[str, typer.Option("--images", "-i", help="A folder of images, 'sample' (bundled photographs), "
                                     "'synthetic' (independent dead-leaves images, the default; 'synthetic:S' at "
                                     "S×S px, 'synthetic:tiled' the faster tiled sampler) or 'noise'.")]
NumImages = Annotated[Optional[int], typer.Option(
    "--num-images", "-n", help=f"Images to average (default {runs.QUICK_SETTINGS['num_images']}; "
    f"{runs.FULL_PROTOCOL_SETTINGS['num_images']} with --full-protocol).", show_default=False)]
Size = Annotated[Optional[int], typer.Option(
    "--size", "-s", help=f"Input size in px (default {runs.QUICK_SETTINGS['input_size']} when the protocol's is "
    "larger, else the protocol's; the protocol's with --full-protocol).", show_default=False)]
FullProtocol = Annotated[bool, typer.Option(
    "--full-protocol", help="Use the protocol's published input size and 50 images (RepLKNet: 1024 px; slow on CPU).")]
ProtocolOpt = Annotated[Protocol, typer.Option("--protocol", "-p", help="ERF protocol preset.")]
Weights = Annotated[Optional[str], typer.Option(
    "--weights", "-w", help="'pretrained' / 'pretrained:TAG' (the published checkpoint: cache or download), a "
    "checkpoint PATH, 'active' (all-branches-active architecture probe) or 'random' (family default init). Default: "
    "trained weights when on disk or downloadable now, else 'active' (the printed defaults say which).",
    show_default=False)]
BatchSize = Annotated[str, typer.Option("--batch-size", "-b", help="Images per forward/backward pass; 'auto' (the "
                                        "fastest measured on the first batches, within the free memory) or 'max' "
                                        "(the largest batch whose estimated peak memory fits).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="fp32 (exact protocol) or bf16/fp16 autocast.")]
Fast = Annotated[bool, typer.Option("--fast/--no-fast", help="Exact fast paths: NHWC, BN folding, RepLKNet "
                                    "re-parameterisation, FFT for depthwise kernels >= 15 (maps change by float "
                                    "rounding only); on by default, --no-fast measures the published training-time "
                                    "structure.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
Formats = Annotated[str, typer.Option("--format", "-f", help="Figure formats, comma-separated: png, pdf, svg.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the init, the sample crops and the bootstrap.")]
ScaleOpt = Annotated[Scale, typer.Option("--scale", help="Colour scale of the heatmaps.")]
Bootstrap = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples over images for the confidence "
                                        "intervals (0: none).", min=0)]


@app.command()
def measure(
    model: Model,
    images: Images = runs.QUICK_SETTINGS["images"],
    num_images: NumImages = None,
    size: Size = None,
    full_protocol: FullProtocol = False,
    protocol: ProtocolOpt = Protocol.replknet,
    target: Annotated[Optional[list[str]], typer.Option(
        "--target", "-t", help="Target module (dotted name) or stage:N; repeat for several.")] = None,
    stage: Annotated[Optional[list[int]], typer.Option("--stage", help="Stage index; repeat for several.")] = None,
    stages: Annotated[bool, typer.Option("--stages", help="Measure every stage (one forward pass).")] = False,
    weights: Weights = None,
    batch_size: BatchSize = "auto",
    device: Device = "cpu",
    precision: PrecisionOpt = Precision.fp32,
    fast: Fast = True,
    out: Out = Path("erf-results"),
    format: Formats = "png",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the partial result in --out.")] = False,
    seed: Seed = 0,
    scale: ScaleOpt = Scale.log,
    bootstrap: Bootstrap = runs.COMMAND_BOOTSTRAP,
    until_converged: Annotated[bool, typer.Option(
        "--until-converged", help="Add images until the AGD score's 95 % interval is at most ±--half-width (checked "
        "at 16, 24, 36, ... images), or --max-images are used.")] = False,
    half_width: Annotated[float, typer.Option("--half-width", help="Target half-width of the AGD interval for "
                                              "--until-converged.", min=1e-6)] = DEFAULT_HALF_WIDTH,
    max_images: Annotated[int, typer.Option("--max-images", help="The most images --until-converged uses.",
                                            min=2)] = DEFAULT_MAX_IMAGES,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", help="ERF option KEY=VALUE overriding the protocol (e.g. gradient=abs); repeatable.")] = None,
) -> None:
    """Measure the ERF of one model, score it (AGD report) and save result, report and heatmap."""
    formats = _formats(format)
    extra = _options(option or [])
    with _errors():
        settings = runs.measure_settings(
            model, protocol=protocol.value, input_size=size, num_images="auto" if until_converged else num_images,
            images=images, weights=weights, targets=_targets(target or [], stage or [], stages, model),
            batch_size=_batch_size(batch_size), device=device, precision=precision.value, seed=seed,
            full_protocol=full_protocol, until_half_width=half_width, max_images=max_images)
        render.note(settings.describe())
        if settings.quick:
            render.note("quick defaults (the published protocol is --full-protocol: "
                        f"{PRESETS[protocol.value].input_size} px, "
                        f"{runs.FULL_PROTOCOL_SETTINGS['num_images']} images)")
        with render.lazy_progress_bar(model) as progress:
            run = runs.run_measure(
                model, images=images, settings=settings, out=out, formats=formats, scale=scale.value,
                resume=resume, bootstrap=bootstrap, progress=progress, fast=fast, **extra)
    rows = tables.scores_table(run.reports, run.results)
    for result, report, row in zip(run.results, run.reports, rows):
        render.report_table(row, f"{result.model} — {result.target} ({result.num_images} images, "
                                 f"{result.input_size[0]}×{result.input_size[1]} px)")
        warning = tables.image_count_warning(report, result)
        if warning:
            render.warning(warning)
    render.files([path for paths in run.files.values() for path in paths])
    render.note(f"done in {run.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------------- compare
@app.command()
def compare(
    results: Annotated[Optional[list[str]], typer.Argument(
        help="Saved results (.npz/.json or their stem), or folders of them (every result an `erf measure --out "
        "FOLDER` wrote there; partial results and reports are skipped).", show_default=False)] = None,
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help="Model to measure and compare; repeat for several.")] = None,
    scale: ScaleOpt = Scale.log,
    normalise: Annotated[Normalise, typer.Option(
        "--normalise", help="Per-map normalisation before the shared colour scale.")] = Normalise.max,
    contours: Annotated[bool, typer.Option("--contours", help="Draw the fitted Gaussian's 1/2/3σ ellipses.")] = False,
    squares: Annotated[bool, typer.Option("--squares", help="Draw RepLKNet's r(t) squares.")] = False,
    stages: Annotated[bool, typer.Option("--stages", help="Also draw per-stage grids (models are measured at every "
                                         "stage).")] = False,
    table: Annotated[TableFormat, typer.Option("--table", help="Scores table format (with --table-out: the file's; "
                                               "only 'terminal' then also prints the table).")] = TableFormat.terminal,
    table_out: Annotated[Optional[Path], typer.Option(
        "--table-out", help="Write the table to this file (format from --table, else from the suffix).")] = None,
    name: Annotated[str, typer.Option("--name", help="Stem of the figure files.")] = "compare",
    title: Annotated[str, typer.Option("--title", help="Figure title.")] = "Effective receptive fields",
    out: Out = Path("erf-results"),
    format: Formats = "png",
    images: Images = runs.QUICK_SETTINGS["images"],
    num_images: NumImages = None,
    size: Size = None,
    full_protocol: FullProtocol = False,
    protocol: ProtocolOpt = Protocol.replknet,
    weights: Weights = None,
    batch_size: BatchSize = "auto",
    device: Device = "cpu",
    fast: Fast = True,
    seed: Seed = 0,
    bootstrap: Bootstrap = runs.COMMAND_BOOTSTRAP,
) -> None:
    """Compare ERFs on one colour scale: figure, radial profiles, per-stage grids and a scores table.

    `erf compare erf-results/` compares every result saved in a folder; files, folders and --model mix freely.
    """
    formats = _formats(format)
    sources = list(results or []) + list(model or [])
    if not sources:
        raise typer.BadParameter("give saved result files or --model NAME (at least one)", param_hint="RESULTS")
    with _errors():
        table_format = None
        if table_out is not None:
            table_format = table.value if table is not TableFormat.terminal else None
        with render.progress_bar() as bar:
            tasks: dict[str, int] = {}

            def progress(name_: str, done: int, total: int) -> None:
                if name_ not in tasks:
                    tasks[name_] = bar.add_task(name_, total=total)
                bar.update(tasks[name_], completed=done, total=total)

            run = runs.run_compare(
                sources, out=out, name=name, scale=scale.value, normalise=normalise.value, contours=contours,
                squares=squares, stages=stages, formats=formats, table_format=table_format, table_path=table_out,
                bootstrap=bootstrap, progress=progress, title=title, images=images, num_images=num_images,
                input_size=size, full_protocol=full_protocol, protocol=protocol.value, weights=weights,
                batch_size=_batch_size(batch_size), device=device, seed=seed, fast=fast)
    # a file format given with --table-out goes to the file only: printing it too would flood the terminal with
    # markdown/csv/json; --table terminal (the default) keeps the readable table on screen beside the file
    if table is TableFormat.terminal:
        render.scores_table(run.rows)
    elif table_out is None:
        render.plain(tables.format_table(run.rows, table.value))
    render.files([p for paths in run.figures.values() for p in paths])
    if run.table_path is not None:
        render.files([run.table_path])


# ---------------------------------------------------------------------------------------------------------- analyze
@app.command()
def analyze(
    result: Annotated[str, typer.Argument(help="A saved result (.npz/.json or their stem).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the report (default: beside "
                                                "the result).", show_default=False)] = None,
    bootstrap: Bootstrap = runs.COMMAND_BOOTSTRAP,
    figure: Annotated[bool, typer.Option("--figure", help="Also redraw the heatmap.")] = False,
    format: Formats = "png",
    scale: ScaleOpt = Scale.log,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
) -> None:
    """Re-score a saved ERF map and write its AGD report."""
    formats = _formats(format)
    with _errors():
        run = runs.run_analyze(result, out=out, bootstrap=bootstrap, figure=figure, formats=formats,
                               scale=scale.value)
    if as_json:
        render.plain(json.dumps(run.report.to_dict(), indent=2) + "\n")
        return
    row = tables.score_row(run.report, run.result)
    render.report_table(row, f"{run.result.model} — {run.result.target} ({run.result.num_images} images, "
                             f"{run.result.input_size[0]}×{run.result.input_size[1]} px, {run.result.protocol})")
    render.files(run.files)


# ----------------------------------------------------------------------------------------------------------- models
@app.command()
def models(
    pattern: Annotated[Optional[str], typer.Argument(
        help="Wildcard over timm's registry (e.g. 'resnet*'); default: erf-tools' families and --import'ed models.",
        show_default=False)] = None,
    params: Annotated[bool, typer.Option("--params/--no-params", help="Count parameters and find the ERF layer "
                                         "(builds each model on the meta device).")] = True,
    table: Annotated[TableFormat, typer.Option("--table", help="Output format.")] = TableFormat.terminal,
) -> None:
    """List registered models: family, parameters, default ERF layer, checkpoint files per weight tag."""
    with _errors():
        rows = catalogue.models_table(pattern, parameters=params)
        if not rows:
            raise ValueError(f"no registered model matches {pattern!r}")
    if table is TableFormat.terminal:
        render.models_table(rows)
    else:
        render.plain(tables.format_table(rows, table.value, catalogue.MODEL_COLUMNS))


# ------------------------------------------------------------------------------------------------------------ check
@app.command()
def check(
    checks: Annotated[Path, typer.Argument(help="A CHECKS.toml: models with settings, expectations and/or snapshot "
                                           "files.", show_default=False)],
    update: Annotated[bool, typer.Option("--update", help="Write or rewrite the snapshot files instead of "
                                         "comparing.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for side-by-side figures of "
                                                "regressions.", show_default=False)] = None,
) -> None:
    """Run ERF regression checks (exit code 0 pass, 1 regression, 2 bad input)."""
    from erf_tools.testing.checks import format_results, run_checks

    with _errors():
        run = run_checks(checks, update=update, out=out)
    render.plain(format_results(run))
    raise typer.Exit(run.exit_code)


def main() -> None:
    """Entry point of the ``erf`` script."""
    app()


if __name__ == "__main__":
    main()
