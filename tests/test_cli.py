"""The ``erf`` command line: success paths, and each expected failure's exit code and one-sentence message."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from erf_tools import runs
from erf_tools.cli.app import app

runner = CliRunner()
SMALL = ["--size", "64", "--num-images", "1", "--bootstrap", "0"]


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split()), result  # output: stdout + stderr; unwrap rich lines


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Two small saved results (resnet18, test_resnet) measured through the CLI."""
    out = tmp_path_factory.mktemp("saved")
    for model in ("resnet18", "test_resnet"):
        code, text, _ = invoke("measure", "-m", model, "-w", "active", "-o", out, *SMALL)
        assert code == 0, text
    return out


def test_measure_writes_result_report_and_heatmap(saved):
    for suffix in (".npz", ".json", ".report.json", ".png"):
        assert (saved / f"resnet18{suffix}").is_file()
    report = json.loads((saved / "resnet18.report.json").read_text())
    assert "agd_score" in report and "fit" in report
    assert not list(saved.glob("*.partial.npz"))  # the partial file is removed once the run is complete


def test_measure_prints_settings_scores_and_the_random_init_warning(tmp_path):
    code, text, _ = invoke("measure", "-m", "resnet18", "-w", "random", "-o", tmp_path, *SMALL)
    assert code == 0, text
    assert "protocol replknet · 64×64 px · 1 images from synthetic · weights random" in text
    assert "warning:" in text and "--weights active" in text
    assert "AGD score" in text and "r(20%)" in text


def test_measure_takes_the_tiled_sampler_and_records_it(tmp_path):
    code, text, _ = invoke("measure", "-m", "test_resnet", "-w", "active", "-i", "synthetic:tiled", "-o", tmp_path,
                           *SMALL)
    assert code == 0, text
    assert "1 images from synthetic:tiled" in text
    assert json.loads((tmp_path / "test_resnet.json").read_text())["image_source"]["model"]["sampler"] == "tiled"
    code, text, _ = invoke("measure", "-m", "test_resnet", "-i", "synthetic:tile", "-o", tmp_path / "bad", *SMALL)
    assert code != 0 and "synthetic image option 'tile'" in text and not (tmp_path / "bad").exists()


def test_default_weights_offline_are_the_probe_and_say_so(tmp_path):
    code, text, _ = invoke("measure", "-m", "resnet18", "-o", tmp_path, *SMALL)
    assert code == 0, text
    assert "1 images from synthetic · weights active" in text
    assert "weights: resnet18.a1_in1k (model.safetensors) is not on disk and was not downloaded" in text
    assert "architecture probe" in text and "silenced" not in text


def test_pretrained_offline_fails_at_once_and_writes_nothing(tmp_path):
    code, text, _ = invoke("measure", "-m", "uniconvnet_t", "-w", "pretrained", "-o", tmp_path / "out", *SMALL)
    assert code == 2
    assert "error: trained weights uniconvnet_t.in1k (uniconvnet_t_1k_224_ema.pth) are not on disk" in text
    assert "huggingface.co/ai-modelwithcode/UniConvNet" in text and "--weights /path/to/" in text
    assert not (tmp_path / "out").exists()


def test_measure_several_stages_and_formats(tmp_path):
    code, text, _ = invoke("measure", "-m", "test_resnet", "--stage", "0", "--stage", "3", "-w", "active",
                           "--format", "png,svg", "-o", tmp_path, *SMALL)
    assert code == 0, text
    assert (tmp_path / "test_resnet_stage-0.npz").is_file() and (tmp_path / "test_resnet_stage-3.svg").is_file()


def test_measure_fast_by_default_records_the_exact_fast_paths_and_matches_the_plain_map(tmp_path):
    from erf_tools.results import load_result

    code, text, _ = invoke("measure", "-m", "test_resnet", "-w", "active", "-o", tmp_path / "fast", *SMALL)
    assert code == 0, text
    code, text, _ = invoke("measure", "-m", "test_resnet", "-w", "active", "--no-fast", "-o", tmp_path / "plain",
                           *SMALL)
    assert code == 0, text
    fast, plain = load_result(tmp_path / "fast" / "test_resnet"), load_result(tmp_path / "plain" / "test_resnet")
    engine = fast.timing["engine"]
    assert engine["channels_last"] and engine["folded_batchnorms"] > 0
    assert "folded_batchnorms" not in plain.timing["engine"]
    assert np.abs(fast.map - plain.map).max() <= 1e-4 * plain.map.max()


def test_unknown_model_suggests_close_names(tmp_path):
    code, text, result = invoke("measure", "-m", "resnet1O1", "-o", tmp_path, *SMALL)
    assert code == 2
    assert "unknown model 'resnet1O1'" in text and "did you mean" in text and "resnet101" in text
    assert "Traceback" not in text
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception


def test_missing_image_folder(tmp_path):
    code, text, _ = invoke("measure", "-m", "resnet18", "--images", tmp_path / "nope", "-o", tmp_path, *SMALL)
    assert code == 2 and "does not exist" in text and "Traceback" not in text


def test_bad_checkpoint_path_and_file(tmp_path):
    code, text, _ = invoke("measure", "-m", "resnet18", "-w", tmp_path / "missing.pth", "-o", tmp_path, *SMALL)
    assert code == 2 and "missing.pth" in text and "does not exist" in text
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    code, text, _ = invoke("measure", "-m", "resnet18", "-w", garbage, "-o", tmp_path, *SMALL)
    assert code == 2 and "garbage.pth" in text and "Traceback" not in text


def test_bad_protocol_is_a_usage_error(tmp_path):
    code, text, _ = invoke("measure", "-m", "resnet18", "--protocol", "replknet2", "-o", tmp_path)
    assert code == 2 and "replknet2" in text and "kim2023" in text


def test_bad_option_and_format_are_usage_errors(tmp_path):
    code, text, _ = invoke("measure", "-m", "resnet18", "--option", "gradiant=abs", "-o", tmp_path, *SMALL)
    assert code == 2 and "gradiant" in text
    code, text, _ = invoke("measure", "-m", "resnet18", "--format", "jpg", "-o", tmp_path, *SMALL)
    assert code == 2 and "jpg" in text and "--format" in text


def test_ctrl_c_exits_130_and_names_the_partial_file(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise runs.MeasurementInterrupted(tmp_path / "resnet18.partial.npz", 3)

    monkeypatch.setattr(runs, "run_measure", interrupted)
    code, text, _ = invoke("measure", "-m", "resnet18", "-o", tmp_path, *SMALL)
    assert code == 130 and "resnet18.partial.npz" in text and "--resume" in text


def test_resume_without_partial_result_is_refused(tmp_path):
    code, text, _ = invoke("measure", "-m", "resnet18", "--resume", "-o", tmp_path, *SMALL)
    assert code == 2 and "no partial result" in text


def test_analyze_rescores_a_saved_result(saved, tmp_path):
    code, text, _ = invoke("analyze", saved / "resnet18.npz", "--out", tmp_path, "--bootstrap", "0", "--figure")
    assert code == 0, text
    assert (tmp_path / "resnet18.report.json").is_file() and (tmp_path / "resnet18.png").is_file()
    code, text, result = invoke("analyze", saved / "resnet18", "--bootstrap", "0", "--json")
    assert code == 0 and json.loads(result.stdout)["protocol"] == "replknet"


def test_unreadable_result_file(tmp_path):
    (tmp_path / "broken.json").write_text("{ not json")
    (tmp_path / "broken.npz").write_bytes(b"nope")
    code, text, _ = invoke("analyze", tmp_path / "broken.npz")
    assert code == 2 and "broken.json" in text and "not valid JSON" in text
    code, text, _ = invoke("analyze", tmp_path / "absent.npz")
    assert code == 2 and "does not exist" in text


def test_compare_saved_results_with_table_file(saved, tmp_path):
    code, text, _ = invoke("compare", saved / "resnet18.npz", saved / "test_resnet", "--contours", "--squares",
                           "--scale", "power", "--out", tmp_path, "--table-out", tmp_path / "scores.md",
                           "--bootstrap", "0")
    assert code == 0, text
    assert (tmp_path / "compare.png").is_file() and (tmp_path / "compare_radial.png").is_file()
    table = (tmp_path / "scores.md").read_text()
    assert table.startswith("| model |") and "resnet18" in table and "test_resnet" in table


@pytest.mark.parametrize("fmt", ["json", "csv", "markdown"])
def test_compare_table_formats_on_stdout(saved, tmp_path, fmt):
    code, text, result = invoke("compare", saved / "resnet18", saved / "test_resnet", "--table", fmt,
                                "--out", tmp_path, "--bootstrap", "0")
    assert code == 0, text
    if fmt == "json":
        rows = json.loads(result.stdout)
        assert [r["model"] for r in rows] == ["resnet18", "test_resnet"]
        assert 0 <= rows[0]["agd_score"] <= 2  # above 1: Gaussian within the noise (signed root)
    elif fmt == "csv":
        assert result.stdout.splitlines()[0].startswith("model,target,")
    else:
        assert "| AGD score |" in result.stdout


def test_compare_a_folder_compares_every_saved_result_in_it(saved, tmp_path):
    folder = tmp_path / "runs"
    shutil.copytree(saved, folder)
    shutil.copy(saved / "resnet18.npz", folder / "resnet18.partial.npz")  # an interrupted run: not a result
    code, text, result = invoke("compare", folder, "--table", "json", "--out", tmp_path / "cmp", "--bootstrap", "0")
    assert code == 0, text
    rows = json.loads(result.stdout)
    assert [r["model"] for r in rows] == ["resnet18", "test_resnet"]  # sorted by file name; no report, no partial
    assert {r["weights"] for r in rows} == {"architecture probe (active init, seed 0)"}
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert [p.name for p in runs.saved_results_in(folder)] == ["resnet18", "test_resnet"]


def test_compare_a_folder_without_results_is_a_usage_error(tmp_path):
    (tmp_path / "notes.json").write_text("{}")
    code, text, _ = invoke("compare", tmp_path, "--out", tmp_path / "cmp")
    assert code == 2 and "holds no saved results" in text and "erf measure --out" in text
    assert "Traceback" not in text


def test_compare_table_file_in_a_file_format_is_not_also_printed(saved, tmp_path):
    code, text, result = invoke("compare", saved / "resnet18", saved / "test_resnet", "--table", "markdown",
                                "--table-out", tmp_path / "scores.md", "--out", tmp_path, "--bootstrap", "0")
    assert code == 0, text
    assert result.stdout == ""  # only the file names, on stderr
    assert f"wrote {tmp_path / 'scores.md'}" in text and "AGD score" not in text and "| model |" not in text
    assert (tmp_path / "scores.md").read_text().startswith("| model | target |")
    code, text, result = invoke("compare", saved / "resnet18", saved / "test_resnet", "--table-out",
                                tmp_path / "scores.csv", "--out", tmp_path, "--bootstrap", "0")
    assert code == 0 and "AGD scores" in result.stdout  # --table terminal (default) still shows the table too
    assert (tmp_path / "scores.csv").read_text().startswith("model,target,")


def test_compare_models_with_stages(tmp_path):
    code, text, _ = invoke("compare", "-m", "test_resnet", "--stages", "-w", "active", "--out", tmp_path,
                           "--name", "g", *SMALL)
    assert code == 0, text
    assert (tmp_path / "g_stages.png").is_file() and (tmp_path / "test_resnet_stage-3.npz").is_file()


def test_compare_needs_something_to_compare(tmp_path):
    code, text, _ = invoke("compare", "--out", tmp_path)
    assert code == 2 and "--model" in text


def test_models_lists_families_with_erf_layer_and_weight_files():
    code, text, result = invoke("models", "uniconvnet_t", "--table", "json")
    assert code == 0, text
    (row,) = json.loads(result.stdout)
    assert row["name"] == "uniconvnet_t" and row["family"] == "uniconvnet" and row["erf_layer"] == "stages.3"
    assert 25 < row["params_m"] < 35
    assert "uniconvnet_t_1k_224_ema.pth" in row["weights"] and row["on_disk"] == "none"
    code, text, result = invoke("models", "--no-params", "--table", "csv")
    assert code == 0, text
    names = {line.split(",")[0] for line in result.stdout.splitlines()[1:]}
    assert {"uniconvnet_t", "replknet_31b", "parc_convnext_t"} <= names and "resnet18" not in names
    code, text, _ = invoke("models", "resnet10?")
    assert code == 0 and "resnet101" in text and "layer4" in text
    code, text, _ = invoke("models", "no_such_model*")
    assert code == 2 and "no registered model matches" in text


def test_import_registers_user_models(tmp_path):
    module = tmp_path / "my_models.py"
    module.write_text(
        "import torch.nn as nn\n"
        "from timm.models import register_model\n"
        "class Tiny(nn.Module):\n"
        "    erf_target = 'body.2'\n"
        "    def __init__(self, **kwargs):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
        "@register_model\n"
        "def erf_test_tiny_net(pretrained=False, **kwargs):\n"
        "    return Tiny(**kwargs)\n"
    )
    code, text, result = invoke("--import", module, "models", "erf_test_tiny*", "--table", "json")
    assert code == 0, text
    (row,) = json.loads(result.stdout)
    assert row["name"] == "erf_test_tiny_net" and row["erf_layer"] == "body.2" and row["family"] == "erf_user_my_models"
    code, text, _ = invoke("--import", module, "measure", "-m", "erf_test_tiny_net", "-o", tmp_path, *SMALL)
    assert code == 0, text
    code, text, _ = invoke("--import", "no_such_module_xyz", "models")
    assert code == 2 and "no_such_module_xyz" in text
