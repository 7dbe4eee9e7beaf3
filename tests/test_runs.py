"""The library behind the ``erf`` commands (:mod:`erf_tools.runs`): settings, resumable runs, comparisons, tables."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from erf_tools import catalogue, runs, tables
from erf_tools.results import load_result
from tests.test_plotting import gaussian_result


def test_quick_and_full_protocol_settings():
    quick = runs.measure_settings("uniconvnet_t")
    assert (quick.input_size, quick.num_images, quick.quick, quick.images) == (512, 32, True, "synthetic")
    assert quick.weights == "random" and quick.protocol == "replknet"
    full = runs.measure_settings("uniconvnet_t", full_protocol=True)
    assert (full.input_size, full.num_images, full.quick) == (1024, 50, False)
    assert runs.measure_settings("resnet50", protocol="kim2023").input_size is None  # the model's native size
    assert runs.measure_settings("resnet50", protocol="luo2016").input_size == 224
    assert runs.measure_settings("resnet50", input_size=300, num_images=3).input_size == 300
    assert "512×512 px" in quick.describe() and "32 images from synthetic" in quick.describe()
    with pytest.raises(ValueError, match="protocol"):
        runs.measure_settings("resnet50", protocol="nope")
    with pytest.raises(ValueError, match="at least 1"):
        runs.measure_settings("resnet50", num_images=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            runs.measure_settings("resnet50", device="cuda")


def test_output_stems():
    assert runs.output_stem("uniconvnet_t", None) == "uniconvnet_t"
    assert runs.output_stem("resnet18", "layer3.1") == "resnet18_layer3-1"
    assert runs.output_stem("resnet18", "stage:2") == "resnet18_stage-2"


def test_interrupted_run_keeps_its_partial_result_and_resumes_to_the_same_map(tmp_path):
    common = dict(input_size=64, num_images=4, batch_size=1, weights="active", bootstrap=0)
    reference = runs.run_measure("test_resnet", out=tmp_path / "ref", **common).result

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(runs.MeasurementInterrupted) as caught:
        runs.run_measure("test_resnet", out=tmp_path / "run", progress=stop_after_two, **common)
    partial = caught.value.partial_path
    assert partial is not None and partial.is_file() and caught.value.done == 2
    assert isinstance(caught.value, KeyboardInterrupt)  # notebooks treat it like any Ctrl-C

    seen = []
    resumed = runs.run_measure("test_resnet", out=tmp_path / "run", resume=True,
                               progress=lambda d, t: seen.append(d), **common)
    assert seen == [3, 4]  # only the remaining images were computed
    assert not partial.exists()
    assert resumed.result.num_images == 4
    np.testing.assert_allclose(resumed.result.map, reference.map, rtol=1e-10, atol=0)
    saved = load_result(tmp_path / "run" / "test_resnet")
    np.testing.assert_allclose(saved.map, reference.map, rtol=1e-10, atol=0)


def test_resume_without_a_partial_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no partial result"):
        runs.run_measure("test_resnet", input_size=64, num_images=1, out=tmp_path, resume=True)


def test_compare_results_writes_figures_and_score_rows(tmp_path):
    results = [gaussian_result("a", sigma=4), gaussian_result("b", sigma=9),
               gaussian_result("b", sigma=3, target="stages.1")]
    run = runs.run_compare(results, out=tmp_path, name="cmp", stages=True, contours=True, squares=True,
                           formats=("png", "svg"), table_path=tmp_path / "scores.csv", bootstrap=0)
    assert [r.model for r in run.results] == ["a", "b"]
    assert [r.target for r in run.stage_results["b"]] == ["stages.1", "stages.3"]  # ordered by stage
    for key, stem in (("compare", "cmp"), ("radial", "cmp_radial"), ("stages", "cmp_stages")):
        assert [p.name for p in run.figures[key]] == [f"{stem}.png", f"{stem}.svg"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "scores.csv").read_text())))
    assert [r["model"] for r in rows] == ["a", "b"]
    assert float(rows[0]["agd_score"]) > 0.9  # a Gaussian on a faint floor


def test_compare_a_folder_mixes_with_explicit_results(tmp_path):
    from erf_tools.results import save_result

    folder = tmp_path / "runs"
    save_result(gaussian_result("b", sigma=9), folder / "b")
    save_result(gaussian_result("a", sigma=4), folder / "a")
    save_result(gaussian_result("c", sigma=3), folder / ".hidden")  # an atomic write's leftover name
    save_result(gaussian_result("d", sigma=3), folder / "d.partial")
    (folder / "a.report.json").write_text("{}")
    assert [p.name for p in runs.saved_results_in(folder)] == ["a", "b"]
    run = runs.run_compare([folder, gaussian_result("e", sigma=6)], out=tmp_path / "cmp", radial=False, bootstrap=0)
    assert [r.model for r in run.results] == ["a", "b", "e"]
    assert [row["weights"] for row in run.rows] == ["architecture probe (active init, seed 0)"] * 3
    with pytest.raises(ValueError, match="holds no saved results"):
        runs.run_compare([tmp_path / "cmp"], out=tmp_path / "cmp", bootstrap=0)


def test_score_rows_and_table_formats():
    report = runs._analyze(gaussian_result(sigma=5), bootstrap=0)
    (row,) = tables.scores_table([report], [gaussian_result(sigma=5)])
    assert row["model"] == "toy" and row["input_size"] == "64×64"
    assert row["weights"] == "architecture probe (active init, seed 0)"  # weights_label, as on the figure panels
    assert row["sigma_major"] == pytest.approx(5, rel=0.1) and row["agd_score"] > 0.9
    rows = [row, dict(row, model="other", agd_score=None, agd_score_ci=[0.5, 0.7])]
    markdown = tables.format_table(rows, "markdown")
    assert markdown.splitlines()[0].startswith("| model | target |") and "| – |" in markdown
    parsed = json.loads(tables.format_table(rows, "json"))
    assert parsed[1]["agd_score"] is None and parsed[1]["agd_score_ci"] == [0.5, 0.7]
    table = list(csv.DictReader(io.StringIO(tables.format_table(rows, "csv"))))
    assert table[1]["agd_score_ci_low"] == "0.5" and table[1]["agd_score"] == ""
    with pytest.raises(ValueError, match="table format"):
        tables.format_table(rows, "html")
    with pytest.raises(ValueError, match="cannot tell"):
        tables.write_table(rows, "scores.txt")


def test_models_table_and_stage_targets():
    (row,) = catalogue.models_table("replknet_31b")
    assert row["family"] == "replknet" and row["erf_layer"] == "stages.3" and row["params_m"] > 70
    assert catalogue.stage_targets("resnet18") == ["stage:0", "stage:1", "stage:2", "stage:3"]


def test_import_modules_reports_failures(tmp_path):
    broken = tmp_path / "broken_models.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ImportError, match="boom"):
        catalogue.import_modules([str(broken)])
    with pytest.raises(ImportError, match="does not exist"):
        catalogue.import_modules([str(tmp_path / "absent.py")])
    with pytest.raises(ImportError):
        catalogue.import_modules(["no_such_module_for_erf_tools"])


def test_image_count_warning_names_what_is_missing():
    from erf_tools import tables

    class Report:
        def __init__(self, needed):
            self.data = {"convergence": {"images_needed": needed}, "confidence_intervals": {"agd_score": [0.5, 0.7]}}

        def to_dict(self):
            return self.data

    result = gaussian_result(sigma=5)
    result.num_images, result.num_independent_images = 20, 12
    text = tables.image_count_warning(Report(55.2), result)
    assert "needs about 56 images" in text and "has 20" in text and "only 12 of its 20" in text
    assert "[0.500, 0.700]" in text and "--images synthetic" in text
    result.num_independent_images = 20
    assert "--images synthetic" not in tables.image_count_warning(Report(55.2), result)
    assert tables.image_count_warning(Report(10.0), result) is None
