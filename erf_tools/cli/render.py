"""Terminal rendering for the ``erf`` command: progress bars, tables, warnings and error lines (rich)."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from erf_tools.catalogue import MODEL_COLUMNS
from erf_tools.tables import SCORE_COLUMNS, format_value, table_cells
from erf_tools.weights import RandomInitWarning

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


class ImagesPerSecond(ProgressColumn):
    """Throughput of the measurement in images per second."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        speed = task.completed / elapsed if elapsed and task.completed else None
        return Text("– img/s" if speed is None else f"{speed:.2f} img/s", style="cyan")


def progress_bar() -> Progress:
    """A progress bar with images done/total, images per second, elapsed time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                    ImagesPerSecond(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=errors, transient=False)


@contextmanager
def lazy_progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback whose bar appears only at its first call, so that a run refused before its first batch
    (a checkpoint that does not match, say) prints no empty ``0/N`` bar."""
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = progress_bar()
            state["bar"].start()
            state["task"] = state["bar"].add_task(description, total=total)
        state["bar"].update(state["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()


@contextmanager
def rich_warnings() -> Iterator[None]:
    """Show Python warnings as one yellow line each (deprecations from other packages stay hidden)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if issubclass(category, RandomInitWarning):
            text += " Hint: pass --weights active (architecture probe) or --weights PATH (trained checkpoint)."
        errors.print(Text("warning: ", style="bold yellow") + Text(text, style="yellow"), soft_wrap=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = previous


def error(message: str) -> None:
    """One red line on stderr."""
    errors.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def warning(message: str) -> None:
    """One yellow warning line on stderr."""
    errors.print(Text("warning: ", style="bold yellow") + Text(message, style="yellow"), soft_wrap=True)


def note(message: str) -> None:
    errors.print(Text(message, style="dim"), soft_wrap=True)


def table(title: str | None, headers: Sequence[str], cells: Sequence[Sequence[str]]) -> Table:
    grid = Table(title=title, title_justify="left", header_style="bold")
    for header in headers:
        grid.add_column(header, overflow="fold")
    for row in cells:
        grid.add_row(*row)
    return grid


def scores_table(rows: Sequence[Mapping[str, Any]], title: str | None = "AGD scores") -> None:
    headers, cells = table_cells(rows, SCORE_COLUMNS)
    console.print(table(title, headers, cells))


def report_table(row: Mapping[str, Any], title: str) -> None:
    """One report as a two-column table (measure, value)."""
    grid = Table(title=title, title_justify="left", show_header=False)
    grid.add_column(style="bold")
    grid.add_column()
    for key, header, kind in SCORE_COLUMNS:
        value = row.get(key)
        if value in (None, ""):
            continue
        grid.add_row(header, format_value(value, kind))
    console.print(grid)


def models_table(rows: Sequence[Mapping[str, Any]]) -> None:
    headers, cells = table_cells(rows, MODEL_COLUMNS)
    console.print(table(f"{len(rows)} models", headers, cells))


def files(paths: Sequence[Any], label: str = "wrote") -> None:
    """The files written, on stderr (stdout may carry a machine-readable table)."""
    for path in paths:
        errors.print(Text(f"{label} ", style="dim") + Text(str(path)), soft_wrap=True)


def plain(text: str) -> None:
    """Machine-readable output (markdown/csv/json) straight to stdout, unstyled."""
    sys.stdout.write(text)
    sys.stdout.flush()
