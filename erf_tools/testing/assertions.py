"""Plain assertions on an ERF's Gaussian fit, for any test framework: :func:`assert_agd`.

Works on an :class:`~erf_tools.ERFResult` (analysed here without a bootstrap), an :class:`~erf_tools.AGDReport` or
its dict (a saved ``.report.json``). Raises :class:`ERFAssertionError` (an ``AssertionError``) with a table of
check, required, now, verdict.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .compare import format_table, format_value
from .tolerances import centre_in_input_pixels

__all__ = ["ERFAssertionError", "Expectation", "BLOCKING_FLAGS", "report_dict", "evaluate_agd", "assert_agd"]

BLOCKING_FLAGS = ("not_gaussian", "empty_map", "nothing_above_floor", "fit:")
"""Flags that ``not_flagged=True`` rejects (``fit:`` = any flag of the full-covariance fit)."""


class ERFAssertionError(AssertionError):
    """An ERF does not meet its expectations; the message has the table."""


@dataclass(frozen=True)
class Expectation:
    """One checked expectation: what was required, what was found, and whether it holds."""

    name: str
    required: str
    now: str
    ok: bool


def report_dict(result_or_report: Any) -> dict[str, Any]:
    """The report dict of an ERFResult (analysed without bootstrap), an AGDReport or a report dict."""
    if isinstance(result_or_report, Mapping):
        return dict(result_or_report)
    if hasattr(result_or_report, "to_dict") and hasattr(result_or_report, "agd_score"):
        return result_or_report.to_dict()
    if hasattr(result_or_report, "map") and hasattr(result_or_report, "per_image_maps"):
        from erf_tools.analysis import analyze

        return analyze(result_or_report, bootstrap=0).to_dict()
    raise TypeError(f"expected an ERFResult, an AGDReport or its dict, got {type(result_or_report).__name__}")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _with_interval(report: Mapping[str, Any], name: str, value: float | None) -> str:
    text = format_value(value)
    pair = (report.get("confidence_intervals") or {}).get(name)
    if value is not None and pair and all(_number(v) is not None for v in pair):
        text += f" [{format_value(float(pair[0]))}, {format_value(float(pair[1]))}]"
    return text


def _reference_centre(report: Mapping[str, Any]) -> tuple[tuple[float, float], str]:
    """The receptive-field centre in input pixels when known, else the input's centre."""
    size = report.get("input_size") or report.get("map_shape")
    shape = report.get("map_shape") or size
    rf = report.get("receptive_field_centre_yx")
    if rf is not None:
        return tuple((float(c) + 0.5) * (float(n) / float(m)) - 0.5 for c, n, m in zip(rf, size, shape)), \
            "receptive-field centre"
    return tuple((float(n) - 1) / 2 for n in size), "input centre"


def evaluate_agd(result_or_report: Any, *, at_least: float | None = None,
                 sigma_between: tuple[float, float] | None = None, centre_within: float | None = None,
                 not_flagged: bool | Iterable[str] = True) -> tuple[list[Expectation], dict[str, Any]]:
    """Evaluate the expectations of :func:`assert_agd`; return them and the report dict."""
    report = report_dict(result_or_report)
    checks: list[Expectation] = []
    if at_least is not None:
        score = _number(report.get("agd_score"))
        checks.append(Expectation("agd_score", f"≥ {at_least:g}", _with_interval(report, "agd_score", score),
                                  score is not None and score >= at_least))
    if sigma_between is not None:
        low, high = (float(v) for v in sigma_between)
        if not low <= high:
            raise ValueError(f"sigma_between must be (low, high) with low <= high, got {sigma_between}")
        for name in ("sigma_major", "sigma_minor"):
            sigma = _number((report.get("spread") or {}).get(name))
            checks.append(Expectation(name, f"in [{low:g}, {high:g}] px", _with_interval(report, name, sigma),
                                      sigma is not None and low <= sigma <= high))
    if centre_within is not None:
        (ry, rx), what = _reference_centre(report)
        cy, cx = centre_in_input_pixels(report)
        distance = None if cy is None or cx is None else math.hypot(cy - ry, cx - rx)
        checks.append(Expectation(
            "centre offset", f"≤ {centre_within:g} px from the {what}",
            "n/a" if distance is None else f"{distance:.3g} px (centre {cy:.1f}, {cx:.1f})",
            distance is not None and distance <= centre_within))
    if not_flagged:
        blocking = BLOCKING_FLAGS if not_flagged is True else tuple(not_flagged)
        found = [f for f in report.get("flags") or [] if any(f == b or (b.endswith(":") and f.startswith(b))
                                                             for b in blocking)]
        checks.append(Expectation("flags", "none of " + ", ".join(f"{b}*" if b.endswith(":") else b
                                                                   for b in blocking),
                                  ", ".join(found) or "-", not found))
    return checks, report


def format_expectations(checks: list[Expectation], title: str) -> str:
    rows = [[c.name, c.required, c.now, "ok" if c.ok else "FAIL"] for c in checks]
    return title + "\n" + format_table(["check", "required", "now", ""], rows, align="llll")


def assert_agd(result_or_report: Any, *, at_least: float | None = None,
               sigma_between: tuple[float, float] | None = None, centre_within: float | None = None,
               not_flagged: bool | Iterable[str] = True) -> None:
    """Assert that an ERF is Gaussian enough, of the right size and in the right place.

    Parameters
    ----------
    result_or_report : ERFResult, AGDReport or report dict
    at_least : AGD score at least this (point estimate; its interval is shown).
    sigma_between : (low, high) bounds in input pixels for both fitted σ (a flagged fit has no σ and fails).
    centre_within : largest distance in input pixels of the centre of the floor-removed map from the receptive-field
        centre (or the input's centre when the report does not know it).
    not_flagged : True rejects :data:`BLOCKING_FLAGS`; an iterable names the flags (a trailing ``:`` matches a
        prefix); False checks no flags.

    Raises
    ------
    ERFAssertionError
        With a table of every expectation (check, required, now, verdict).
    """
    checks, report = evaluate_agd(result_or_report, at_least=at_least, sigma_between=sigma_between,
                                  centre_within=centre_within, not_flagged=not_flagged)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ERFAssertionError(format_expectations(
            checks, f"ERF expectations not met ({len(failed)} of {len(checks)}: "
                    f"{', '.join(c.name for c in failed)})"))
