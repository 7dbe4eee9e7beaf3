"""``erf check CHECKS.toml``: each exit code (0 pass, 1 regression, 2 bad input), in the library and the command."""
from __future__ import annotations

import warnings

import pytest
from typer.testing import CliRunner

from erf_tools.cli.app import app
from erf_tools.testing.checks import ChecksFileError, load_checks, run_checks

MODEL = '''
from timm.models import register_model
from torch import nn

KERNEL = {kernel}

class Net(nn.Module):
    erf_target = "body.4"

    def __init__(self, **kwargs):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, KERNEL, padding=KERNEL // 2), nn.ReLU(),
                                  nn.Conv2d(8, 8, KERNEL, padding=KERNEL // 2), nn.ReLU(),
                                  nn.Conv2d(8, 8, KERNEL, padding=KERNEL // 2))

    def forward(self, x):
        return self.body(x)

@register_model
def erf_check_net(pretrained=False, **kwargs):
    return Net()
'''

CHECKS = '''
import = ["net.py"]

[defaults]
input_size = 32
num_images = 4
bootstrap = 20
weights = "active"

[[check]]
model = "erf_check_net"
snapshot = "snapshots/net.json"
{extra}
'''


def write(folder, kernel=3, extra=""):
    (folder / "net.py").write_text(MODEL.format(kernel=kernel))
    path = folder / "CHECKS.toml"
    path.write_text(CHECKS.format(extra=extra))
    return path


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns when a re-imported module registers its model again
        yield


@pytest.mark.slow
def test_update_then_pass_then_regression(tmp_path):
    path = write(tmp_path)
    run = run_checks(path)  # no snapshot yet: bad input, with the command that creates it
    assert run.exit_code == 2 and run.results[0].status == "missing snapshot"
    assert f"erf check {path} --update" in run.results[0].message

    run = run_checks(path, update=True)
    assert run.exit_code == 0 and run.results[0].status == "written"
    assert (tmp_path / "snapshots" / "net.json").is_file()
    run = run_checks(path)
    assert run.exit_code == 0 and run.results[0].status == "pass", run.results[0].message

    write(tmp_path, kernel=5)  # larger kernels: a larger ERF
    run = run_checks(path, out=tmp_path / "figures")
    assert run.exit_code == 1 and run.results[0].status == "regression"
    assert "sigma_major" in run.results[0].message and "FAIL" in run.results[0].message
    assert list((tmp_path / "figures").rglob("*.png"))

    write(tmp_path, extra="input_size = 48")
    run = run_checks(path)
    assert run.exit_code == 1 and run.results[0].status == "settings changed"
    assert "input_size: [32, 32] → [48, 48]" in run.results[0].message


def test_expectations(tmp_path):
    write(tmp_path)
    path = tmp_path / "EXPECT.toml"
    base = ('import = ["net.py"]\n[[check]]\nmodel = "erf_check_net"\nweights = "active"\ninput_size = 32\n'
            "num_images = 4\nbootstrap = 0\nnot_flagged = false\n")
    path.write_text(base + "at_least = 0.0\nsigma_between = [0.1, 100]\n")
    run = run_checks(path)
    assert run.exit_code == 0, run.results[0].message
    path.write_text(base + "at_least = 0.9999\n")
    run = run_checks(path)
    assert run.exit_code == 1 and run.results[0].status == "expectations failed"
    assert "agd_score" in run.results[0].message and "≥ 0.9999" in run.results[0].message


@pytest.mark.parametrize("text, message", [
    ("[[check]\nmodel = 1", "not valid TOML"),
    ('[[check]]\nmodel = "resnet18"\nat_least = 0.5\ncolour = "red"', "unknown key(s) colour"),
    ("[[check]]\nat_least = 0.5", "has no model"),
    ('[[check]]\nmodel = "resnet18"', "checks nothing"),
    ('[[check]]\nmodel = "resnet18"\nsigma_between = 3', "sigma_between must be [low, high]"),
    ('[[check]]\nmodel = "resnet18"\nat_least = 0.5\ninput_size = -1', "input_size must be a non-negative"),
    ('[defaults]\nsnapshot = "x.json"\n[[check]]\nmodel = "resnet18"', "[defaults]: unknown key(s) snapshot"),
    ("import = 3\n[[check]]\nmodel = 'resnet18'\nat_least = 0.5", "import must be a list"),
    ("title = 'x'", "unknown key(s) title"),
    ("", "has no checks"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "CHECKS.toml"
    path.write_text(text)
    with pytest.raises(ChecksFileError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_checks(path)


def test_unknown_model_and_tolerance_are_bad_input(tmp_path):
    path = tmp_path / "CHECKS.toml"
    path.write_text('[[check]]\nmodel = "resnet_18"\nat_least = 0.5\n')
    run = run_checks(path)
    assert run.exit_code == 2 and run.results[0].status == "error" and "did you mean" in run.results[0].message
    path = write(tmp_path, extra="tolerances = { agd_scor = 0.1 }")
    run = run_checks(path, update=True)
    assert run.exit_code == 2 and "tolerance for unknown field 'agd_scor'" in run.results[0].message


def test_command_exit_codes(tmp_path):
    runner = CliRunner()
    path = write(tmp_path)
    result = runner.invoke(app, ["check", str(path), "--update"])
    assert result.exit_code == 0, result.output
    assert "written" in result.output and "all checks passed (exit code 0)" in result.output
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0 and "pass" in result.output
    write(tmp_path, kernel=5)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1 and "ERF regression (exit code 1)" in result.output
    result = runner.invoke(app, ["check", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())
