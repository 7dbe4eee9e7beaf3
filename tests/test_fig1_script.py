"""figures/uniconvnet_fig1.py end to end on two tiny timm models (the line-up itself is run by hand)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "figures" / "uniconvnet_fig1.py"
TINY_MODELS = ("resnet10t", "resnet18")


@pytest.fixture(scope="module")
def fig1():
    spec = importlib.util.spec_from_file_location("figures_uniconvnet_fig1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fig1_script_writes_figure_radial_profiles_and_scores(fig1, tmp_path, capsys):
    argv = ["--models", *TINY_MODELS, "--size", "32", "--num-images", "2", "--bootstrap", "10",
            "--out", str(tmp_path)]
    assert fig1.main(argv) == 0
    for name in ("uniconvnet_fig1.png", "uniconvnet_fig1_radial.png", "uniconvnet_fig1_scores.md"):
        assert (tmp_path / name).is_file(), name
    assert "architecture probe" in (tmp_path / "uniconvnet_fig1_scores.md").read_text() or \
        "active" in (tmp_path / "uniconvnet_fig1_scores.md").read_text()  # offline default: the probe, and says so
    saved = json.loads((tmp_path / "results" / "fig1" / f"{TINY_MODELS[0]}.json").read_text())
    assert saved["image_source"]["kind"] == "synthetic"  # the script's default source reaches the engine
    assert fig1.main(argv) == 0  # a rerun with the same settings reuses the saved results
    assert capsys.readouterr().out.count("reusing the saved result") == len(TINY_MODELS)


def test_weights_dir_finds_checkpoints_by_official_file_name(fig1, tmp_path):
    (tmp_path / "uniconvnet_t_1k_224_ema.pth").write_bytes(b"")
    assert fig1.checkpoint_in(tmp_path, "uniconvnet_t") == tmp_path / "uniconvnet_t_1k_224_ema.pth"
    assert fig1.checkpoint_in(tmp_path, "slak_t") is None  # SLaK publishes no file name: slak_t.pth is looked for
    (tmp_path / "slak_t.pth").write_bytes(b"")
    assert fig1.weights_for("slak_t", None, tmp_path) == str(tmp_path / "slak_t.pth")
