"""One regression check against a snapshot file: shared by the pytest fixture and ``erf check``.

:func:`check_snapshot` takes a captured ERF (:mod:`erf_tools.testing.capture`) and a snapshot path and returns a
:class:`CheckOutcome`: ``"written"``/``"unchanged"`` in update mode, else ``"missing snapshot"``, ``"settings
changed"``, ``"regression"`` or ``"pass"``, with the readable message. On a regression it draws the side-by-side
figure into ``figure_dir``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compare import Comparison, compare_snapshots, format_comparison
from .snapshot import Snapshot, read_snapshot, write_snapshot
from .tolerances import DEFAULT_FACTOR, check_tolerances

__all__ = ["CheckOutcome", "check_snapshot", "PASSING"]

PASSING = ("pass", "written", "unchanged")


@dataclass
class CheckOutcome:
    """What one snapshot check found (see the module docstring)."""

    status: str
    snapshot_path: Path
    message: str
    comparison: Comparison | None = None
    figure: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status in PASSING


def check_snapshot(current: Snapshot, snapshot_path: str | Path, *, update: bool = False,
                   tolerances: Mapping[str, Any] | None = None, factor: float = DEFAULT_FACTOR,
                   label: str = "this model", update_command: str | None = None,
                   figure_dir: str | Path | None = None, shown_path: str | None = None) -> CheckOutcome:
    """Compare ``current`` with the snapshot at ``snapshot_path`` (or write it, with ``update=True``); messages name
    the file as ``shown_path`` (default: the path as given)."""
    path = Path(snapshot_path)
    shown = shown_path or str(path)
    check_tolerances(tolerances, current.fields)
    if update:
        written = write_snapshot(path, current)
        status = "written" if written else "unchanged"
        return CheckOutcome(status, path, f"ERF snapshot {status}: {shown}")
    if not path.is_file():
        how = f"; create it with:\n    {update_command}" if update_command else ""
        return CheckOutcome("missing snapshot", path, f"no ERF snapshot for {label} at {shown}{how}")
    stored = read_snapshot(path)
    comparison = compare_snapshots(stored, current, tolerances=tolerances, factor=factor)
    figure = None
    if comparison.status == "regression" and figure_dir is not None and stored.map is not None \
            and current.map is not None:
        from .figure import side_by_side_figure

        figure = side_by_side_figure(stored.map, current.map, Path(figure_dir) / f"{path.stem}.erf_maps.png",
                                     title=f"{label}: snapshot vs now")
    titles = {"pass": f"ERF of {label} matches its snapshot",
              "regression": f"ERF regression in {label}: numbers outside their allowed difference",
              "settings changed": f"ERF snapshot settings changed for {label}"}
    message = format_comparison(comparison, title=titles[comparison.status], snapshot_path=shown,
                                figure=None if figure is None else str(figure), update_command=update_command)
    return CheckOutcome(comparison.status, path, message, comparison, figure)
