"""Which numbers a regression check compares, and how far each may move: tolerances from the noise.

The compared numbers are read from the generic report dict (``AGDReport.to_dict()``): the AGD score, the fitted σ
(major, minor), R², Mardia's β₂, and the centre (y, x) of the floor-removed map in input pixels, so: is the ERF
still Gaussian, has it shrunk, has it moved. Any other top-level number that has a confidence interval of the same name
(``confidence_intervals[name] = (lo, hi)``) is compared too, so new scores slot in without code changes. Others can be
asked for by name: r(t) (``"r(0.5)"``), the fit's own σ in map pixels, flagged or not (``"fit_sigma_major"``,
``"fit_sigma_minor"``), and the map's sum and maximum (``"map_sum"``, ``"map_max"``: they move with the engine or a
model, not with the analysis).

Allowed difference of one number between the snapshot (s) and now (n), first rule that applies:

1. an explicit per-field tolerance (``tolerances={"agd_score": 0.01}``): that absolute difference;
2. both have a finite interval: ``factor × √(h_s² + h_n²)`` with h the half-widths. With 95 % intervals (h ≈ 1.96
   standard errors) and ``factor = 1`` this is a two-sided 95 % test that two independent measurements of the
   same ERF agree: a difference below it is within what another draw of images would give;
3. only one side has an interval: ``factor × √2 × h`` (the same noise assumed on both sides);
4. no noise estimate at all (no bootstrap, one image): a numeric comparison, ``FALLBACK_RTOL × max(|s|, |n|) +
   FALLBACK_ATOL``: same code and seeds give the same numbers up to float rounding.

A number that is undefined on one side only (σ of a flagged fit, say) fails; undefined on both passes. Settings are
compared exactly (:mod:`erf_tools.testing.compare`). Pure Python.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .snapshot import FieldValue

__all__ = ["DEFAULT_FIELDS", "DEFAULT_FACTOR", "FALLBACK_RTOL", "FALLBACK_ATOL", "FieldResult", "report_fields",
           "allowed_difference", "compare_fields", "check_tolerances"]

DEFAULT_FIELDS = ("agd_score", "sigma_major", "sigma_minor", "r_squared", "beta2", "centre_y", "centre_x")
"""Compared by default: shape (AGD score, R², β₂), size (σ) and position (centre) of the ERF."""
DEFAULT_FACTOR = 1.0
"""Multiplies the combined half-widths (rule 2 of the module docstring)."""
FALLBACK_RTOL = 1e-4
FALLBACK_ATOL = 1e-9

#: Where a number lives in the report dict (name of its interval = the key here).
REPORT_PATHS: dict[str, tuple[str, ...]] = {
    "agd_score": ("agd_score",),
    "sigma_major": ("spread", "sigma_major"),
    "sigma_minor": ("spread", "sigma_minor"),
    "r_squared": ("r_squared",),  # noise-corrected, like its interval; the fit's own is r_squared_raw
    "beta2": ("shape", "mardia_kurtosis"),
    "fit_sigma_major": ("fit", "sigma_major"),  # the fit's own σ in map pixels, also when the fit is flagged
    "fit_sigma_minor": ("fit", "sigma_minor"),
    "map_sum": ("openerf_metrics", "sum"),  # these two move with the engine or a model, not with the analysis
    "map_max": ("openerf_metrics", "max"),
}
CENTRE_FIELDS = ("centre_y", "centre_x")


@dataclass(frozen=True)
class FieldResult:
    """One compared number: snapshot and current value, their difference, the allowed difference and the rule."""

    name: str
    snapshot: float | None
    now: float | None
    allowed: float | None
    rule: str  # "tolerance", "noise", "noise (one side)", "numeric", "undefined", "not in snapshot"
    ok: bool

    @property
    def difference(self) -> float | None:
        if self.snapshot is None or self.now is None:
            return None
        return self.now - self.snapshot


def _finite(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _lookup(data: Mapping[str, Any], path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _interval(intervals: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    pair = intervals.get(name)
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return None
    low, high = _finite(pair[0]), _finite(pair[1])
    return None if low is None or high is None else (low, high)


def _area_ratio(report: Mapping[str, Any], name: str) -> float | None:
    threshold = _finite(name[2:-1])
    for entry in report.get("area_ratios") or []:
        if threshold is not None and math.isclose(float(entry.get("threshold", math.nan)), threshold):
            return _finite(entry.get("ratio"))
    return None


def centre_in_input_pixels(report: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Centre of mass of the floor-removed map, in input pixels (map pixel centres mapped onto the input grid)."""
    centre = _lookup(report, ("spread", "moments_floor_removed", "centre_yx")) or (None, None)
    map_shape = report.get("map_shape") or (None, None)
    input_size = report.get("input_size") or map_shape
    out = []
    for c, n_map, n_in in zip(centre, map_shape, input_size):
        c = _finite(c)
        out.append(None if c is None or not n_map else (c + 0.5) * (float(n_in) / float(n_map)) - 0.5)
    return out[0], out[1]


def report_fields(report: Mapping[str, Any], *, fields: Iterable[str] | None = None,
                  extra_intervals: Mapping[str, Any] | None = None) -> dict[str, FieldValue]:
    """The compared numbers of a report dict with their intervals (see the module docstring).

    ``fields`` chooses them (default :data:`DEFAULT_FIELDS` plus every top-level number that has an interval of its
    own name); ``extra_intervals`` adds intervals the report does not carry (the centre's, from
    :func:`erf_tools.testing.noise.centre_intervals`).
    """
    intervals = dict(report.get("confidence_intervals") or {})
    intervals.update(extra_intervals or {})
    if fields is None:
        names = list(DEFAULT_FIELDS)
        names += [k for k in sorted(intervals) if k not in REPORT_PATHS and k not in CENTRE_FIELDS
                  and isinstance(report.get(k), (int, float)) and not isinstance(report.get(k), bool)]
    else:
        names = list(fields)
    centre = centre_in_input_pixels(report)
    out = {}
    for name in names:
        if name in CENTRE_FIELDS:
            value = centre[CENTRE_FIELDS.index(name)]
        elif name in REPORT_PATHS:
            value = _finite(_lookup(report, REPORT_PATHS[name]))
        elif name.startswith("r(") and name.endswith(")"):
            value = _area_ratio(report, name)
        elif name in report:
            value = _finite(report[name])
        else:
            raise ValueError(f"unknown field {name!r}: choose from {', '.join(DEFAULT_FIELDS)}, r(t) or a top-level "
                             "number of the report")
        out[name] = FieldValue(value, _interval(intervals, name))
    return out


def check_tolerances(tolerances: Mapping[str, Any] | None, known: Iterable[str]) -> dict[str, float]:
    """Validate per-field tolerances: known field names, non-negative finite numbers."""
    checked: dict[str, float] = {}
    known = list(known)
    for name, value in (tolerances or {}).items():
        if name not in known:
            raise ValueError(f"tolerance for unknown field {name!r}; the compared fields are {', '.join(known)}")
        number = _finite(value)
        if number is None or number < 0:
            raise ValueError(f"the tolerance of {name!r} must be a non-negative number, got {value!r}")
        checked[name] = number
    return checked


def allowed_difference(snapshot: FieldValue, now: FieldValue, *, tolerance: float | None = None,
                       factor: float = DEFAULT_FACTOR) -> tuple[float, str]:
    """(allowed |now − snapshot|, rule name) by the rules of the module docstring."""
    if tolerance is not None:
        return float(tolerance), "tolerance"
    scale = max(abs(v) for v in (snapshot.value, now.value) if v is not None) if (
        snapshot.value is not None or now.value is not None) else 0.0
    numeric = FALLBACK_RTOL * scale + FALLBACK_ATOL
    widths = [h for h in (snapshot.half_width, now.half_width) if h is not None]
    # an interval that collapsed to a point (a bounded score at its bound) still allows float rounding
    if len(widths) == 2:
        return max(factor * math.hypot(*widths), numeric), "noise"
    if len(widths) == 1:
        return max(factor * math.sqrt(2.0) * widths[0], numeric), "noise (one side)"
    return numeric, "numeric"


def compare_fields(snapshot: Mapping[str, FieldValue], now: Mapping[str, FieldValue], *,
                   tolerances: Mapping[str, Any] | None = None, factor: float = DEFAULT_FACTOR) -> list[FieldResult]:
    """Compare every number of the snapshot (in its order) with the current one.

    A field missing now counts as undefined (fails); a field only computed now is listed with the rule
    ``"not in snapshot"`` and passes (rewrite the snapshot to track it).
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"the tolerance factor must be a positive number, got {factor!r}")
    order = {name: i for i, name in enumerate(DEFAULT_FIELDS)}
    names = sorted(snapshot, key=lambda k: (order.get(k, len(order)), k))
    names += [k for k in now if k not in snapshot]
    overrides = check_tolerances(tolerances, names)
    results = []
    for name in names:
        s, n = snapshot.get(name, FieldValue(None)), now.get(name, FieldValue(None))
        if name not in snapshot:
            results.append(FieldResult(name, None, n.value, None, "not in snapshot", True))
            continue
        allowed, rule = allowed_difference(s, n, tolerance=overrides.get(name), factor=factor)
        if s.value is None or n.value is None:
            ok = s.value is None and n.value is None
            results.append(FieldResult(name, s.value, n.value, None if not ok else allowed, "undefined", ok))
            continue
        ok = abs(n.value - s.value) <= allowed
        results.append(FieldResult(name, s.value, n.value, allowed, rule, ok))
    return results
