"""The pytest plugin: the README's "Regression tests for your model" example run as written (create, pass, fail on a
real change, fail on changed settings, fail without a snapshot), and the plugin's registration."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import timm  # noqa: F401  (see below)
import torch  # noqa: F401  pytester restores sys.modules after each in-process run; torch cannot be imported twice

from erf_tools.testing.entry_point import PLUGIN, autoloaded
from erf_tools.testing.tolerances import DEFAULT_FIELDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
# the plugin module is already imported here, so the inner pytest cannot rewrite its asserts: say nothing of it
PLUGIN_ARGS = [] if autoloaded() else ["-p", PLUGIN, "-W", "ignore::pytest.PytestAssertRewriteWarning"]


def readme_example() -> dict[str, list]:
    """Code blocks of the README section: python files (by their first-line name), diffs and outputs, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Regression tests for your model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    files = {body.splitlines()[0][2:].strip(): body for kind, body in blocks
             if kind == "python" and body.startswith("# ") and body.splitlines()[0].endswith(".py")}
    diffs = [[(line[1:]) for line in body.splitlines() if line[:1] in "-+"] for kind, body in blocks if kind == "diff"]
    outputs = [body for kind, body in blocks if kind == "text"]
    return {"files": files, "diffs": diffs, "outputs": outputs}


def apply_diff(files: dict[str, str], diff: list[str]) -> dict[str, str]:
    """Apply a one-line README diff (``-old`` / ``+new``) to whichever file holds the old line."""
    old, new = diff
    changed = {name: body.replace(old, new) for name, body in files.items() if old in body}
    assert len(changed) == 1, f"the README diff line {old!r} is not in exactly one example file"
    return {**files, **changed}


def assert_matches(expected: str, output: str) -> None:
    """Each line of the README's message is in the output: field rows by name and verdict, lines with numbers up to
    the first digit (numbers may differ in the last digits across platforms), other lines verbatim."""
    lines = [line.strip() for line in output.splitlines()]
    for line in (line.strip() for line in expected.splitlines() if line.strip()):
        words = line.split()
        if words[0] in DEFAULT_FIELDS:
            verdict = line.split("  ")[-1].strip()
            assert any(a.split()[:1] == [words[0]] and a.endswith(verdict) for a in lines), (line, output)
        elif re.search(r"\d", line):
            prefix = line[: re.search(r"\d", line).start()]
            assert any(a.startswith(prefix) for a in lines), (line, output)
        else:
            assert line in lines, (line, output)


def run(pytester: pytest.Pytester, files: dict[str, str], *args: str):
    pytester.makepyfile(**{name[:-3]: body for name, body in files.items()})
    return pytester.runpytest("-p", "no:cacheprovider", *PLUGIN_ARGS, *args)


@pytest.mark.slow
def test_readme_example(pytester: pytest.Pytester):
    example = readme_example()
    files, (break_erf, change_settings), (created, regression, settings) = (
        example["files"], example["diffs"], example["outputs"])
    assert set(files) == {"my_models.py", "test_my_models.py"}

    result = run(pytester, files, "test_my_models.py", "--erf-update")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    for line in created.splitlines()[-3:-1]:  # "1 snapshot(s) written:" and its path
        assert line.strip() in out
    snapshot = pytester.path / "__erf_snapshots__" / "test_my_models" / "test_tinynet_erf.json"
    text = snapshot.read_text()
    assert '"erf_snapshot": 1' in text and '"agd_score": {"interval": [' in text

    run(pytester, files, "test_my_models.py").assert_outcomes(passed=1)
    result = run(pytester, files, "test_my_models.py", "--erf-update")  # an unchanged snapshot is not rewritten
    assert "1 snapshot(s) unchanged" in result.stdout.str() and snapshot.read_text() == text

    result = run(pytester, apply_diff(files, break_erf), "test_my_models.py")
    result.assert_outcomes(failed=1)
    assert_matches(regression, result.stdout.str())
    figure = re.search(r"side by side: (\S+\.png)", result.stdout.str()).group(1)
    assert Path(figure).is_file() and Path(figure).stat().st_size > 1000

    result = run(pytester, apply_diff(files, change_settings), "test_my_models.py")
    result.assert_outcomes(failed=1)
    assert_matches(settings, result.stdout.str())
    assert "agd_score" not in result.stdout.str()  # settings changed: the scores were not compared

    snapshot.unlink()
    result = run(pytester, files, "test_my_models.py")
    result.assert_outcomes(failed=1)
    assert ("create it with:\n    pytest test_my_models.py::test_tinynet_erf --erf-update"
            in result.stdout.str())


def test_tolerances_override_names_and_results(pytester: pytest.Pytester):
    """A measured ERFResult is taken as is; per-field tolerances; two checks in one test need names."""
    test = '''
        import numpy as np
        import pytest
        from erf_tools.results import ERFResult

        def gaussian_result(centre):
            yy, xx = np.mgrid[:32, :32]
            rng = np.random.default_rng(0)
            base = np.exp(-((yy - centre) ** 2 + (xx - 16) ** 2) / (2 * 4.0 ** 2))
            maps = np.stack([base * rng.uniform(0.8, 1.2) + rng.uniform(0, 0.02, base.shape) for _ in range(6)])
            return ERFResult(map=maps.mean(0), per_image_maps=maps, per_image_downsample=1, num_images=6,
                             num_rejected=0, rejected_images=[], image_ids=[str(i) for i in range(6)], target="t",
                             feature_shape=(1, 1, 1), centre_unit=(0, 0), receptive_field_centre=(16.0, 16.0),
                             total_stride=(32.0, 32.0), input_size=(32, 32), model="synthetic", protocol="replknet",
                             options={}, weights={"source": "module"}, image_source={"kind": "synthetic"},
                             preprocessing={}, seed=0)

        CENTRE = float(open("centre.txt").read())

        def test_two(erf_regression):
            erf_regression.check(gaussian_result(CENTRE), name="b", bootstrap=20, tolerances={"centre_y": 5.0})
            erf_regression.check(gaussian_result(CENTRE), name="a", bootstrap=20)

        def test_unnamed_twice(erf_regression):
            erf_regression.check(gaussian_result(16), bootstrap=0)
            with pytest.raises(ValueError, match="its own name"):
                erf_regression.check(gaussian_result(16), bootstrap=0)
    '''
    pytester.makepyfile(test_synthetic=test)
    pytester.path.joinpath("centre.txt").write_text("16")
    result = pytester.runpytest("-p", "no:cacheprovider", *PLUGIN_ARGS, "--erf-update")
    result.assert_outcomes(passed=2)
    folder = pytester.path / "__erf_snapshots__" / "test_synthetic"
    assert sorted(p.name for p in folder.iterdir()) == ["test_two.a.json", "test_two.b.json",
                                                        "test_unnamed_twice.json"]
    pytester.path.joinpath("centre.txt").write_text("17")  # the ERF moves by 1 px: far beyond the centre's noise
    result = pytester.runpytest("-p", "no:cacheprovider", *PLUGIN_ARGS, "test_synthetic.py::test_two")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "test_synthetic.py::test_two (a)" in out and "(b)" not in out  # b's loose centre tolerance holds
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("centre_y"))
    assert row[-1] == "FAIL" and abs(float(row[1]) - 16) < 0.1 and abs(float(row[2]) - 17) < 0.1, row
    assert abs(float(row[3]) - 1) < 0.1 and float(row[4]) < 0.1, row  # moved 1 px; allowed: the centre's noise


def test_entry_point_names_the_plugin_module():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["entry-points"]["pytest11"] == {"erf_tools": "erf_tools.testing.pytest_plugin"}
    assert data["tool"]["setuptools"]["packages"]["find"]["include"] == ["erf_tools*"]  # erf_tools.testing included
    import erf_tools.testing.pytest_plugin as plugin

    assert callable(plugin.pytest_addoption) and hasattr(plugin, "erf_regression")


@pytest.mark.parametrize("module", ["pytest_plugin.py", "__init__.py", "entry_point.py"])
def test_plugin_loads_without_heavy_imports(module):
    """Loaded in every pytest run where erf-tools is installed: only the standard library and pytest at import."""
    tree = ast.parse((ROOT / "erf_tools" / "testing" / module).read_text(encoding="utf-8"))
    names = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert names <= set(sys.stdlib_module_names) | {"pytest", "__future__"}, names
