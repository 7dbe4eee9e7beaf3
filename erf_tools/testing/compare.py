"""Compare a stored snapshot with the current one, and say what changed in a readable table.

Order of the verdict: changed settings first (then the numbers are not compared: a different protocol, input size,
image set, weights or seed makes them incomparable, and the message says which settings changed); then every number
within its allowed difference (:mod:`erf_tools.testing.tolerances`). Flags, versions, weights and the maps'
correlation are reported alongside but decide nothing. Pure Python.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .snapshot import Snapshot, SnapshotMap
from .tolerances import DEFAULT_FACTOR, FieldResult, compare_fields

__all__ = ["SettingChange", "Comparison", "compare_snapshots", "settings_changes", "map_correlation",
           "format_table", "format_comparison", "format_value"]


@dataclass(frozen=True)
class SettingChange:
    """One setting that differs: its dotted key and both values (None: absent)."""

    key: str
    snapshot: Any
    now: Any

    def describe(self) -> str:
        return f"{self.key}: {_short(self.snapshot)} → {_short(self.now)}"


@dataclass
class Comparison:
    """Outcome of :func:`compare_snapshots`. ``status``: ``"pass"``, ``"regression"`` or ``"settings changed"``."""

    fields: list[FieldResult]
    settings: list[SettingChange]
    map_correlation: float | None
    flags_snapshot: tuple[str, ...] = ()
    flags_now: tuple[str, ...] = ()
    versions: list[SettingChange] = field(default_factory=list)
    weights: list[SettingChange] = field(default_factory=list)
    factor: float = DEFAULT_FACTOR

    @property
    def status(self) -> str:
        if self.settings:
            return "settings changed"
        return "regression" if self.failed else "pass"

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    @property
    def failed(self) -> list[FieldResult]:
        """The numbers outside their allowed difference (empty when the settings changed: nothing was compared)."""
        return [] if self.settings else [f for f in self.fields if not f.ok]


def settings_changes(snapshot: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[SettingChange]:
    """Every differing leaf of two nested settings dicts, as dotted keys."""
    changes = []
    for key in sorted(set(snapshot) | set(now), key=str):
        a, b = snapshot.get(key), now.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += settings_changes(a, b, dotted + ".")
        elif _normalised(a) != _normalised(b):
            changes.append(SettingChange(dotted, a, b))
    return changes


def _normalised(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def map_correlation(a: SnapshotMap | None, b: SnapshotMap | None) -> float | None:
    """Pearson correlation of two stored maps (None when one is missing, their shapes differ or one is constant)."""
    if a is None or b is None or a.shape != b.shape or a.downsample != b.downsample:
        return None
    x = [v for row in a.values for v in row]
    y = [v for row in b.values for v in row]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
    sxx = sum((u - mx) ** 2 for u in x)
    syy = sum((v - my) ** 2 for v in y)
    if not (sxx > 0 and syy > 0):
        return None
    return sxy / math.sqrt(sxx * syy)


def compare_snapshots(snapshot: Snapshot, now: Snapshot, *, tolerances: Mapping[str, Any] | None = None,
                      factor: float = DEFAULT_FACTOR) -> Comparison:
    """Compare ``now`` with the stored ``snapshot`` (settings exactly, numbers within their tolerances)."""
    return Comparison(
        fields=compare_fields(snapshot.fields, now.fields, tolerances=tolerances, factor=factor),
        settings=settings_changes(snapshot.settings, now.settings),
        map_correlation=map_correlation(snapshot.map, now.map),
        flags_snapshot=tuple(snapshot.flags), flags_now=tuple(now.flags),
        versions=settings_changes(snapshot.versions, now.versions),
        weights=settings_changes(snapshot.weights, now.weights), factor=factor)


# ------------------------------------------------------------------------------------------------------- formatting
def _short(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_value(value: float | None, reference: float | None = None) -> str:
    """A number with 4 significant digits (more when needed to tell it from ``reference``); ``n/a`` for None."""
    if value is None:
        return "n/a"
    for digits in (4, 5, 6, 7):
        text = f"{value:.{digits}g}"
        if reference is None or reference == value or f"{reference:.{digits}g}" != text:
            return text
    return f"{value:.8g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain-text table, columns two spaces apart; ``align`` has one ``l``/``r`` per column (default: numbers
    right-aligned between a left-aligned first and last column)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 2) + "l"

    def line(cells):
        parts = [str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)]
        return "  " + "  ".join(parts).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _field_rows(results: Sequence[FieldResult]) -> list[list[str]]:
    rows = []
    for r in results:
        diff = r.difference
        if r.rule == "not in snapshot":
            verdict = "new (not in snapshot)"
        elif r.rule == "undefined":
            verdict = "ok" if r.ok else "FAIL (defined on one side only)"
        else:
            verdict = "ok" if r.ok else "FAIL"
        rows.append([r.name, format_value(r.snapshot, r.now), format_value(r.now, r.snapshot),
                     "n/a" if diff is None else f"{diff:+.3g}", "n/a" if r.allowed is None else f"{r.allowed:.3g}",
                     verdict])
    return rows


def format_comparison(comparison: Comparison, *, title: str, snapshot_path: str | None = None,
                      figure: str | None = None, update_command: str | None = None) -> str:
    """The failure (or success) message: a table of field, snapshot, now, difference, allowed difference, verdict."""
    lines = [title]
    if comparison.settings:
        lines.append("settings changed, so the scores were not compared:")
        lines += [f"  {c.describe()}" for c in comparison.settings]
    else:
        lines.append(format_table(["field", "snapshot", "now", "difference", "allowed", ""],
                                  _field_rows(comparison.fields)))
        rules = sorted({r.rule for r in comparison.fields})
        if "noise" in rules or "noise (one side)" in rules:
            lines.append(f"  allowed = {comparison.factor:g} × √(h_snapshot² + h_now²), h = half-widths of the "
                         "95 % bootstrap intervals; tolerances={field: value} overrides")
        if "numeric" in rules:
            lines.append("  fields without intervals (no bootstrap) are compared numerically (rtol 1e-4)")
        corr = comparison.map_correlation
        maps = "n/a" if corr is None else f"{corr:.4f}"
        lines.append(f"  ERF maps: correlation {maps} (snapshot vs now, block means ≤ 32×32)"
                     + (f"; side by side: {figure}" if figure else ""))
    if tuple(comparison.flags_snapshot) != tuple(comparison.flags_now):
        before, after = ", ".join(comparison.flags_snapshot) or "-", ", ".join(comparison.flags_now) or "-"
        lines.append(f"  flags: {before} → {after}")
    if comparison.weights:
        lines.append("  weights: " + "; ".join(c.describe() for c in comparison.weights))
    if comparison.versions:
        lines.append("  versions: " + "; ".join(c.describe() for c in comparison.versions))
    if snapshot_path:
        lines.append(f"  snapshot: {snapshot_path}")
    if update_command and not comparison.ok:
        what = "the new settings are" if comparison.settings else "the change is"
        lines.append(f"if {what} intended, rewrite the snapshot: {update_command}")
    return "\n".join(lines)
