"""pytest plugin of erf-tools (entry point ``pytest11``): the ``erf_regression`` fixture and ``--erf-update``.

    def test_my_block(erf_regression):
        erf_regression.check(MyNet(), input_size=64, num_images=8)

``check`` measures the ERF (or takes an ``ERFResult``), analyses it and compares it with the snapshot
``__erf_snapshots__/<test module>/<test name>.json`` beside the test file. ``pytest --erf-update`` writes or rewrites
snapshots (only files whose text changes are touched). A missing snapshot fails with the command that creates it; a
changed setting fails as "settings changed"; numbers outside their noise-derived tolerances fail with a table, the
maps' correlation and a side-by-side figure in pytest's temporary directory.

The fixture seeds torch (``torch.manual_seed(ERF_SEED)``) before the test body runs, so a model built in the test is
the same model on every run. This module imports only the standard library and pytest: the measurement machinery is
loaded when a test uses the fixture.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ERF_SEED", "ERFRegression", "erf_regression"]

ERF_SEED = 0
_RECORD = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("erf-tools", "ERF regression snapshots (erf-tools)")
    group.addoption("--erf-update", action="store_true", default=False,
                    help="write or rewrite the ERF snapshots of the erf_regression fixture instead of comparing")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORD] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    record = config.stash.get(_RECORD, [])
    if not record:
        return
    terminalreporter.section("erf-tools snapshots")
    for status in ("written", "unchanged"):
        paths = [p for s, p in record if s == status]
        if paths:
            terminalreporter.write_line(f"{len(paths)} snapshot(s) {status}" + (":" if status == "written" else ""))
            if status == "written":
                for path in paths:
                    terminalreporter.write_line(f"  {path}")


class ERFRegression:
    """The ``erf_regression`` fixture's object: one snapshot per ``check`` call (see the module docstring)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._request = request
        self._tmp = tmp_path_factory
        self._names: set[str | None] = set()
        node = request.node
        self.update = bool(request.config.getoption("--erf-update"))
        self.test_file = Path(node.path)
        self.test_name = node.nodeid.split("::", 1)[1].replace("::", ".") if "::" in node.nodeid else node.name

    def snapshot_path(self, name: str | None = None) -> Path:
        """Where the snapshot of this test (and of the check called ``name``) lives."""
        from erf_tools.testing.snapshot import snapshot_path

        return snapshot_path(self.test_file, self.test_name, name)

    def _shown(self, path: Path) -> str:
        """``path`` relative to where pytest was started, when it lies below it."""
        try:
            return path.relative_to(Path(self._request.config.invocation_params.dir)).as_posix()
        except ValueError:
            return str(path)

    def update_command(self) -> str:
        """The exact command that (re)writes this test's snapshots, relative to where pytest was started."""
        node = f"{self._shown(self.test_file)}::{self._request.node.nodeid.split('::', 1)[-1]}"
        return f"pytest {shlex.quote(node)} --erf-update"

    def check(self, model_or_result: Any, *, name: str | None = None, tolerances: dict[str, float] | None = None,
              factor: float | None = None, fields: list[str] | None = None, bootstrap: int | None = None,
              **measure_options: Any) -> Any:
        """Measure (``nn.Module`` or registered name, with :func:`erf_tools.measure_erf` options) or take (an
        ``ERFResult``) an ERF and compare it with this test's snapshot; fail the test when it does not match.

        ``tolerances={"agd_score": 0.01}`` sets a field's allowed absolute difference; ``factor`` scales the
        noise-derived ones (default 1); ``fields`` chooses the compared numbers; ``bootstrap`` the resamples of the
        intervals (default :data:`erf_tools.testing.capture.DEFAULT_BOOTSTRAP`); ``name`` tells several checks in
        one test apart. Returns the :class:`~erf_tools.testing.regression.CheckOutcome`.
        """
        from erf_tools.testing.capture import DEFAULT_BOOTSTRAP, capture
        from erf_tools.testing.regression import check_snapshot
        from erf_tools.testing.snapshot import safe_name
        from erf_tools.testing.tolerances import DEFAULT_FACTOR

        if name in self._names:
            raise ValueError("this test already made a check" + (f" called {name!r}" if name else " without a name")
                             + ": give each check in a test its own name=")
        self._names.add(name)
        label = self._request.node.nodeid + ("" if name is None else f" ({name})")
        captured = capture(model_or_result, bootstrap=DEFAULT_BOOTSTRAP if bootstrap is None else bootstrap,
                           fields=fields, test=self._request.node.nodeid, **measure_options)
        # created only when a regression draws its figure
        figures = self._tmp.getbasetemp() / "erf_regression" / safe_name(self._request.node.name)[:60]
        outcome = check_snapshot(captured.snapshot, self.snapshot_path(name), update=self.update,
                                 tolerances=tolerances, factor=DEFAULT_FACTOR if factor is None else factor,
                                 label=label, update_command=self.update_command(), figure_dir=figures,
                                 shown_path=self._shown(self.snapshot_path(name)))
        if outcome.status in ("written", "unchanged"):
            self._request.config.stash[_RECORD].append((outcome.status, self._shown(outcome.snapshot_path)))
        if not outcome.ok:
            pytest.fail(outcome.message, pytrace=False)
        return outcome


@pytest.fixture
def erf_regression(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ERFRegression:
    """Compare ERFs with snapshots stored beside the test file (``pytest --erf-update`` writes them)."""
    import torch

    torch.manual_seed(ERF_SEED)
    return ERFRegression(request, tmp_path_factory)
