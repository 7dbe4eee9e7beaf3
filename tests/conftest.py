"""Suite-wide settings: the erf-tools pytest plugin (also when it is not installed with its entry point: a worktree
or an editable install made before the entry point existed); no test reaches the network, and weight caches are
private to each test."""
from __future__ import annotations

import pytest

from erf_tools.testing.entry_point import PLUGIN, autoloaded

pytest_plugins = [] if autoloaded() else [PLUGIN]


@pytest.fixture(autouse=True)
def _offline_weight_caches(monkeypatch, tmp_path_factory):
    """Downloads off (erf_tools.pretrained fails at once) and empty Hugging Face / torch hub caches, so that what a
    test sees does not depend on the machine's own caches or its network."""
    root = tmp_path_factory.mktemp("weight-caches")
    monkeypatch.setenv("ERF_TOOLS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "huggingface" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
