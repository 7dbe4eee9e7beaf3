"""Is the erf-tools pytest plugin loaded by pytest itself? (A separate module, so that asking does not import the
plugin before pytest does: pytest could then not rewrite its asserts.)"""
from __future__ import annotations

__all__ = ["PLUGIN", "autoloaded"]

PLUGIN = "erf_tools.testing.pytest_plugin"


def autoloaded() -> bool:
    """True when pytest loads this plugin by itself: its ``pytest11`` entry point is installed and plugin autoloading
    is not disabled. Otherwise name it with ``-p erf_tools.testing.pytest_plugin`` (or ``pytest_plugins``)."""
    import os
    from importlib.metadata import entry_points

    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == PLUGIN for ep in entry_points(group="pytest11"))
