"""The erf-tools pytest plugin for our own tests, also when it is not installed with its entry point (a worktree or
an editable install made before the entry point existed)."""
from erf_tools.testing.pytest_plugin import autoloaded

pytest_plugins = [] if autoloaded() else ["erf_tools.testing.pytest_plugin"]
