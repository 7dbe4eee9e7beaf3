"""Regression tests on ERF Gaussian-fit scores for your own models.

- :func:`assert_agd`: plain assertions (AGD score, σ range, centre, flags) for any test framework;
- the pytest plugin :mod:`erf_tools.testing.pytest_plugin` (fixture ``erf_regression``, option ``--erf-update``),
  active whenever erf-tools is installed;
- :func:`erf_tools.testing.checks.run_checks`: the same checks from a ``CHECKS.toml`` (``erf check``).

Names are imported on first use, so that loading the pytest plugin costs nothing until a test uses it.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["assert_agd", "ERFAssertionError", "capture", "check_snapshot", "compare_snapshots", "read_snapshot",
           "write_snapshot", "Snapshot", "run_checks"]

_WHERE = {"assert_agd": "assertions", "ERFAssertionError": "assertions", "capture": "capture",
          "check_snapshot": "regression", "compare_snapshots": "compare", "read_snapshot": "snapshot",
          "write_snapshot": "snapshot", "Snapshot": "snapshot", "run_checks": "checks"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
