"""ERF snapshots: what a regression check stores about one ERF, and its diff-friendly JSON file.

A snapshot holds the settings that produced the ERF (compared exactly), the compared numbers with their confidence
intervals (compared within tolerances, :mod:`erf_tools.testing.tolerances`), the flags, a small max-normalised copy
of the map (≤ 32 × 32 block means, for the maps' correlation and a side-by-side figure), the package versions and
a description of the weights (informational). The file is JSON with sorted keys, one field per line, each map row on
one line, and numbers rounded (fields to 6 significant digits, the map to 4 decimals), so that a changed snapshot
reads well in a code review. Pure Python: no torch, no NumPy.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SNAPSHOT_SCHEMA", "MAP_SIDE", "FieldValue", "SnapshotMap", "Snapshot", "SnapshotError", "read_snapshot",
           "write_snapshot", "snapshot_text", "snapshot_path", "safe_name"]

SNAPSHOT_SCHEMA = 1
"""Version of the snapshot file layout (a newer one is refused, not misread)."""
MAP_SIDE = 32
"""Largest side of the stored map (block means of the ERF map)."""
FIELD_DIGITS = 6
MAP_DECIMALS = 4


class SnapshotError(ValueError):
    """A snapshot file is unreadable, malformed or from a newer erf-tools."""


@dataclass(frozen=True)
class FieldValue:
    """One compared number: its value (None when undefined, e.g. σ of a flagged fit) and its interval, if any."""

    value: float | None
    interval: tuple[float, float] | None = None

    @property
    def half_width(self) -> float | None:
        """Half the interval's width, the noise scale of the value (None without a finite interval)."""
        if self.interval is None:
            return None
        low, high = self.interval
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            return None
        return abs(high - low) / 2

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": _round(self.value, FIELD_DIGITS)}
        if self.half_width is not None:
            out["interval"] = [_round(v, FIELD_DIGITS) for v in self.interval]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> FieldValue:
        if not isinstance(data, dict) or "value" not in data:
            raise SnapshotError(f"a field must be {{'value': ..., 'interval': [lo, hi]}}, got {data!r}")
        interval = data.get("interval")
        if interval is not None:
            if not (isinstance(interval, list) and len(interval) == 2):
                raise SnapshotError(f"an interval must be [lo, hi], got {interval!r}")
            interval = (_number(interval[0]), _number(interval[1]))
        return cls(_number(data["value"]), interval)


@dataclass(frozen=True)
class SnapshotMap:
    """The ERF map reduced by ``downsample`` × ``downsample`` block means and divided by its maximum."""

    values: tuple[tuple[float, ...], ...]
    downsample: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.values), len(self.values[0]) if self.values else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"downsample": self.downsample, "normalisation": "max", "shape": list(self.shape),
                "values": [[_round_fixed(v, MAP_DECIMALS) for v in row] for row in self.values]}

    @classmethod
    def from_dict(cls, data: Any) -> SnapshotMap:
        try:
            values = tuple(tuple(float(v) for v in row) for row in data["values"])
            downsample = int(data["downsample"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"the snapshot's map is malformed ({exc})") from exc
        if not values or len({len(row) for row in values}) != 1:
            raise SnapshotError("the snapshot's map must be a non-empty rectangular list of rows")
        return cls(values, downsample)


@dataclass
class Snapshot:
    """Everything a regression check compares (see the module docstring)."""

    settings: dict[str, Any]
    fields: dict[str, FieldValue]
    flags: tuple[str, ...] = ()
    map: SnapshotMap | None = None
    versions: dict[str, str] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # informational: device, map shape, the report's noise model
    test: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"erf_snapshot": SNAPSHOT_SCHEMA, "settings": _plain(self.settings),
               "fields": {k: v.to_dict() for k, v in self.fields.items()}, "flags": list(self.flags),
               "versions": dict(self.versions), "weights": _plain(self.weights), "info": _plain(self.info)}
        if self.map is not None:
            out["map"] = self.map.to_dict()
        if self.test is not None:
            out["test"] = self.test
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "snapshot") -> Snapshot:
        if not isinstance(data, dict) or "erf_snapshot" not in data:
            raise SnapshotError(f"{source} is not an erf-tools snapshot (no 'erf_snapshot' key)")
        version = data["erf_snapshot"]
        if not isinstance(version, int) or version > SNAPSHOT_SCHEMA:
            raise SnapshotError(f"{source} was written by a newer erf-tools (snapshot schema {version}; this one "
                                f"reads up to {SNAPSHOT_SCHEMA}): upgrade erf-tools or rewrite the snapshot")
        for key in ("settings", "fields"):
            if not isinstance(data.get(key), dict):
                raise SnapshotError(f"{source} lacks its {key!r} table")
        try:
            fields_ = {str(k): FieldValue.from_dict(v) for k, v in data["fields"].items()}
        except SnapshotError as exc:
            raise SnapshotError(f"{source}: {exc}") from exc
        return cls(settings=data["settings"], fields=fields_, flags=tuple(data.get("flags") or ()),
                   map=SnapshotMap.from_dict(data["map"]) if data.get("map") else None,
                   versions=dict(data.get("versions") or {}), weights=dict(data.get("weights") or {}),
                   info=dict(data.get("info") or {}), test=data.get("test"))


# ------------------------------------------------------------------------------------------------------------- files
def safe_name(text: str) -> str:
    """A file name from a test name: characters other than letters, digits, ``._-[]`` become ``_``."""
    cleaned = "".join(c if c.isalnum() or c in "._-[]" else "_" for c in text)
    return cleaned.strip(".") or "_"


def snapshot_path(test_file: str | Path, test_name: str, check_name: str | None = None) -> Path:
    """``<folder of test_file>/__erf_snapshots__/<test module>/<test name>[.<check name>].json``."""
    test_file = Path(test_file)
    stem = safe_name(test_name) + ("" if check_name is None else "." + safe_name(check_name))
    return test_file.parent / "__erf_snapshots__" / test_file.stem / f"{stem}.json"


def snapshot_text(snapshot: Snapshot) -> str:
    """The file's text (see the module docstring); equal snapshots give equal text."""
    return _dump(snapshot.to_dict(), 0) + "\n"


def write_snapshot(path: str | Path, snapshot: Snapshot) -> bool:
    """Write the snapshot atomically; return False (and leave the file alone) when its text would not change."""
    path = Path(path)
    text = snapshot_text(snapshot)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def read_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot file; :class:`SnapshotError` names what is wrong (FileNotFoundError when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"snapshot {str(path)!r} is not valid JSON ({exc})") from exc
    return Snapshot.from_dict(data, source=f"snapshot {str(path)!r}")


# ------------------------------------------------------------------------------------------------------- formatting
def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SnapshotError(f"expected a number or null, got {value!r}")
    return float(value)


def _round(value: Any, digits: int) -> Any:
    """Round to ``digits`` significant digits; non-finite numbers become None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _round_fixed(value: float, decimals: int) -> float:
    value = float(value)
    return round(value, decimals) if math.isfinite(value) else 0.0


def _plain(value: Any) -> Any:
    """JSON-ready copy with sorted keys, tuples as lists and floats rounded."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return _round(value, FIELD_DIGITS)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # NumPy scalars
        return _plain(value.item())
    return str(value)


_INLINE = 100


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _dump(value: Any, indent: int) -> str:
    """JSON with sorted keys; short dicts and lists of scalars (a map row) on one line, the rest one item a line."""
    compact = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
    if _scalar(value):
        return compact
    if isinstance(value, list) and all(_scalar(v) for v in value):
        return compact
    if isinstance(value, dict) and len(compact) + indent <= _INLINE and all(
            _scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v)) for v in value.values()):
        return compact
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + ",\n".join(inner + _dump(v, indent + 2) for v in value) + "\n" + pad + "]"
    if not value:
        return "{}"
    items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dump(v, indent + 2)}" for k, v in sorted(value.items())]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"
