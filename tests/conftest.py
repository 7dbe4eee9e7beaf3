"""The erf-tools pytest plugin for our own tests, also when it is not installed with its entry point (a worktree or
an editable install made before the entry point existed)."""
from erf_tools.testing.entry_point import PLUGIN, autoloaded

pytest_plugins = [] if autoloaded() else [PLUGIN]
