"""``erf check CHECKS.toml``: ERF regression checks for CI systems that do not use pytest.

A checks file lists models with their settings, and for each either expectations (as :func:`assert_agd`), a snapshot
file, or both::

    import = ["my_models.py"]            # optional: modules that register models (paths relative to this file)

    [defaults]                           # optional: settings shared by every check
    input_size = 64
    num_images = 8

    [[check]]
    name = "tinynet"                     # optional (default: the model name)
    model = "tinynet"                    # a registered timm / erf-tools name
    weights = "active"                   # measure_erf settings: images, input_size, num_images, protocol, target,
                                         # weights, seed, batch_size, device, precision, options = {...}
    snapshot = "erf-snapshots/tinynet.json"   # compared with (or, with --update, written to) this file
    tolerances = { agd_score = 0.05 }         # and factor, fields, bootstrap: as erf_regression.check
    at_least = 0.7                       # expectations: at_least, sigma_between, centre_within, not_flagged
    sigma_between = [4, 20]

Exit code (:attr:`ChecksRun.exit_code`): 0 every check passed (or its snapshot was written); 1 a regression (numbers
outside their tolerances, changed settings, unmet expectations); 2 bad input (unreadable or invalid file, unknown
model or option, a snapshot named but missing: create it with ``--update``). The whole file is validated before
anything is measured.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare import format_table

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["ChecksFileError", "CheckSpec", "CheckResult", "ChecksRun", "load_checks", "run_checks",
           "format_results", "MEASURE_KEYS", "EXPECTATION_KEYS", "SNAPSHOT_KEYS"]

MEASURE_KEYS = ("images", "input_size", "num_images", "protocol", "target", "weights", "seed", "batch_size",
                "device", "precision", "options")
EXPECTATION_KEYS = ("at_least", "sigma_between", "centre_within", "not_flagged")
SNAPSHOT_KEYS = ("snapshot", "tolerances", "factor", "fields", "bootstrap")
CHECK_KEYS = ("name", "model", *MEASURE_KEYS, *EXPECTATION_KEYS, *SNAPSHOT_KEYS)
TOP_KEYS = ("import", "defaults", "check")
BAD_INPUT = ("missing snapshot", "error")


class ChecksFileError(ValueError):
    """The checks file is unreadable or invalid."""


@dataclass
class CheckSpec:
    """One validated ``[[check]]`` entry (defaults merged in)."""

    name: str
    model: str
    measure: dict[str, Any]
    expectations: dict[str, Any]
    snapshot: Path | None
    tolerances: dict[str, float] = field(default_factory=dict)
    factor: float | None = None
    fields: list[str] | None = None
    bootstrap: int | None = None


@dataclass
class CheckResult:
    """Outcome of one check: ``status`` is ``pass``, ``written``, ``unchanged``, ``regression``, ``settings
    changed``, ``expectations failed``, ``missing snapshot`` or ``error``."""

    name: str
    model: str
    status: str
    message: str = ""
    seconds: float = 0.0
    agd_score: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "written", "unchanged")


@dataclass
class ChecksRun:
    """Every check of a file, in order."""

    path: Path
    results: list[CheckResult]

    @property
    def exit_code(self) -> int:
        if any(r.status in BAD_INPUT for r in self.results):
            return 2
        return 0 if all(r.ok for r in self.results) else 1


# ------------------------------------------------------------------------------------------------------- validation
def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ChecksFileError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def _spec(entry: Any, defaults: Mapping[str, Any], base: Path, index: int) -> CheckSpec:
    where = f"check {index + 1}"
    if not isinstance(entry, Mapping):
        raise ChecksFileError(f"{where} must be a table ([[check]])")
    _check_keys(entry, CHECK_KEYS, where)
    merged = {**defaults, **entry}
    model = merged.get("model")
    if not isinstance(model, str) or not model:
        raise ChecksFileError(f"{where} has no model = \"NAME\" (a registered model name)")
    name = str(merged.get("name") or model)
    where = f"check {name!r}"
    measure = {k: merged[k] for k in MEASURE_KEYS if k in merged}
    options = measure.pop("options", {})
    if not isinstance(options, Mapping):
        raise ChecksFileError(f"{where}: options must be a table of ERF options")
    clash = sorted(set(options) & set(MEASURE_KEYS))
    if clash:
        raise ChecksFileError(f"{where}: give {', '.join(clash)} as check keys, not in options")
    measure.update(options)
    for key in ("input_size", "num_images", "seed", "batch_size", "bootstrap"):
        if key in merged and (not isinstance(merged[key], int) or isinstance(merged[key], bool) or merged[key] < 0):
            raise ChecksFileError(f"{where}: {key} must be a non-negative integer, got {merged[key]!r}")
    expectations = {k: merged[k] for k in EXPECTATION_KEYS if k in merged}
    if "sigma_between" in expectations:
        pair = expectations["sigma_between"]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise ChecksFileError(f"{where}: sigma_between must be [low, high] in pixels, got {pair!r}")
        expectations["sigma_between"] = tuple(float(v) for v in pair)
    for key in ("at_least", "centre_within"):
        if key in expectations and (isinstance(expectations[key], bool)
                                    or not isinstance(expectations[key], (int, float))):
            raise ChecksFileError(f"{where}: {key} must be a number, got {expectations[key]!r}")
    snapshot = merged.get("snapshot")
    if snapshot is not None and not isinstance(snapshot, str):
        raise ChecksFileError(f"{where}: snapshot must be a file path, got {snapshot!r}")
    if snapshot is None and not expectations:
        raise ChecksFileError(f"{where} checks nothing: give a snapshot file, expectations "
                              f"({', '.join(EXPECTATION_KEYS)}), or both")
    tolerances = merged.get("tolerances", {})
    if not isinstance(tolerances, Mapping):
        raise ChecksFileError(f"{where}: tolerances must be a table, e.g. {{ agd_score = 0.02 }}")
    fields_ = merged.get("fields")
    if fields_ is not None and not (isinstance(fields_, list) and all(isinstance(f, str) for f in fields_)):
        raise ChecksFileError(f"{where}: fields must be a list of field names")
    factor = merged.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
        raise ChecksFileError(f"{where}: factor must be a positive number, got {factor!r}")
    return CheckSpec(name=name, model=model, measure=measure, expectations=expectations,
                     snapshot=None if snapshot is None else (base / snapshot), tolerances=dict(tolerances),
                     factor=None if factor is None else float(factor), fields=fields_,
                     bootstrap=merged.get("bootstrap"))


def load_checks(path: str | Path) -> tuple[list[CheckSpec], list[str]]:
    """Read and validate a checks file: (checks, modules to import with paths resolved); raise
    :class:`ChecksFileError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ChecksFileError(f"checks file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ChecksFileError(f"{str(path)!r} is not valid TOML: {exc}") from exc
    _check_keys(data, TOP_KEYS, str(path))
    base = path.parent
    imports = data.get("import", [])
    if isinstance(imports, str):
        imports = [imports]
    if not (isinstance(imports, list) and all(isinstance(m, str) for m in imports)):
        raise ChecksFileError("import must be a list of module names or .py paths")
    modules = [str(base / m) if m.endswith(".py") else m for m in imports]
    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise ChecksFileError("[defaults] must be a table")
    _check_keys(defaults, tuple(k for k in CHECK_KEYS if k not in ("name", "snapshot")), "[defaults]")
    entries = data.get("check")
    if not isinstance(entries, list) or not entries:
        raise ChecksFileError(f"{str(path)!r} has no checks: add [[check]] tables with model = \"NAME\"")
    specs = [_spec(entry, defaults, base, i) for i, entry in enumerate(entries)]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ChecksFileError(f"check names must be unique; repeated: {', '.join(duplicates)} (give name = ...)")
    return specs, modules


# ------------------------------------------------------------------------------------------------------------ running
def _run_one(spec: CheckSpec, *, update: bool, out: Path | None, command: str) -> CheckResult:
    from .assertions import evaluate_agd, format_expectations
    from .capture import DEFAULT_BOOTSTRAP, capture
    from .regression import check_snapshot
    from .snapshot import safe_name
    from .tolerances import DEFAULT_FACTOR

    started = time.perf_counter()
    try:
        captured = capture(spec.model, bootstrap=DEFAULT_BOOTSTRAP if spec.bootstrap is None else spec.bootstrap,
                           fields=spec.fields, test=spec.name, **spec.measure)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
        return CheckResult(spec.name, spec.model, "error", f"{spec.name}: {exc}", time.perf_counter() - started)
    messages, status = [], "pass"
    if spec.snapshot is not None:
        try:
            outcome = check_snapshot(captured.snapshot, spec.snapshot, update=update, tolerances=spec.tolerances,
                                     factor=DEFAULT_FACTOR if spec.factor is None else spec.factor,
                                     label=f"check {spec.name!r}", update_command=command,
                                     figure_dir=None if out is None else out / safe_name(spec.name))
        except ValueError as exc:
            return CheckResult(spec.name, spec.model, "error", f"{spec.name}: {exc}", time.perf_counter() - started)
        status = outcome.status
        if not outcome.ok or outcome.status == "written":
            messages.append(outcome.message)
    if spec.expectations:
        checks, _ = evaluate_agd(captured.report, **spec.expectations)
        if not all(c.ok for c in checks):
            messages.append(format_expectations(checks, f"ERF expectations not met for check {spec.name!r}"))
            if status in ("pass", "written", "unchanged"):
                status = "expectations failed"
    return CheckResult(spec.name, spec.model, status, "\n".join(messages), time.perf_counter() - started,
                       captured.report.agd_score)


def run_checks(path: str | Path, *, update: bool = False, out: str | Path | None = None) -> ChecksRun:
    """Run every check of a checks file (the ``erf check`` command); figures of regressions go to ``out``.

    Raises :class:`ChecksFileError` (bad input, exit code 2) before measuring anything when the file is invalid or a
    module to import fails.
    """
    from erf_tools.catalogue import import_modules

    path = Path(path)
    specs, modules = load_checks(path)
    try:
        import_modules(modules)
    except ImportError as exc:
        raise ChecksFileError(str(exc)) from exc
    command = f"erf check {path} --update"
    out = None if out is None else Path(out)
    return ChecksRun(path, [_run_one(spec, update=update, out=out, command=command) for spec in specs])


def format_results(run: ChecksRun) -> str:
    """The results table, then the message of every check that did not simply pass."""
    rows = [[r.name, r.model, "–" if r.agd_score is None else f"{r.agd_score:.3f}", f"{r.seconds:.1f}", r.status]
            for r in run.results]
    text = format_table(["check", "model", "AGD score", "seconds", "status"], rows, align="llrrl")
    details = [r.message for r in run.results if r.message]
    summary = {0: "all checks passed", 1: "ERF regression", 2: "bad input"}[run.exit_code]
    return "\n\n".join([text, *details, f"{summary} (exit code {run.exit_code})"]) + "\n"
