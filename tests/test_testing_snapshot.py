"""erf_tools.testing without torch: snapshot files, tolerance rules, comparison, centre noise and assert_agd, on
analytic cases and synthetic Gaussian maps with known truth."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from erf_tools.analysis import analyze
from erf_tools.testing.assertions import ERFAssertionError, assert_agd
from erf_tools.testing.compare import compare_snapshots, format_comparison, map_correlation, settings_changes
from erf_tools.testing.noise import centre_intervals
from erf_tools.testing.regression import check_snapshot
from erf_tools.testing.snapshot import (FieldValue, Snapshot, SnapshotError, SnapshotMap, read_snapshot,
                                        snapshot_path, snapshot_text, write_snapshot)
from erf_tools.testing.tolerances import (FALLBACK_RTOL, allowed_difference, compare_fields, report_fields)


def gaussian_stack(n=8, side=64, centre=(30.0, 33.0), sigma=(6.0, 4.0), seed=0):
    """Per-image maps: an axis-aligned Gaussian with per-image gain and uniform pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    base = np.exp(-0.5 * (((yy - centre[0]) / sigma[0]) ** 2 + ((xx - centre[1]) / sigma[1]) ** 2))
    return np.stack([base * rng.uniform(0.8, 1.2) + rng.uniform(0, 0.01, base.shape) for _ in range(n)])


class Result:
    """The attributes of an ERFResult that the analysis and the centre's noise use."""

    def __init__(self, stack, input_size=None, down=1):
        self.map = stack.mean(axis=0) if down == 1 else np.kron(stack.mean(axis=0), np.ones((down, down))) / down**2
        self.per_image_maps = stack
        self.per_image_downsample = down
        self.num_images = stack.shape[0]
        self.input_size = input_size or self.map.shape
        self.protocol, self.receptive_field_centre, self.options = "replknet", None, {}


def snapshot(**changes):
    base = dict(settings={"model": "net", "input_size": [64, 64], "options": {"gradient": "relu"}},
                fields={"agd_score": FieldValue(0.9512345678, (0.93, 0.96)), "sigma_major": FieldValue(None)},
                flags=("not_gaussian",), map=SnapshotMap(((0.0, 0.5), (0.25, 1.0)), 2),
                versions={"torch": "2.14.1"}, weights={"parameters": 10})
    base.update(changes)
    return Snapshot(**base)


# ----------------------------------------------------------------------------------------------------------- files
def test_snapshot_file_is_sorted_rounded_and_one_field_per_line(tmp_path):
    text = snapshot_text(snapshot())
    lines = text.splitlines()
    assert '    "agd_score": {"interval": [0.93, 0.96], "value": 0.951235},' in lines  # 6 significant digits
    assert '    "sigma_major": {"value": null}' in lines
    assert '      [0.0, 0.5],' in lines and '      [0.25, 1.0]' in lines  # one map row a line
    top = [line.split('"')[1] for line in lines if line.startswith('  "')]
    assert top == sorted(top) and top[0] == "erf_snapshot"
    path = tmp_path / "a" / "s.json"
    assert write_snapshot(path, snapshot()) is True
    assert write_snapshot(path, snapshot()) is False  # same text: the file is left alone
    again = read_snapshot(path)
    assert snapshot_text(again) == text and again.fields["agd_score"].interval == (0.93, 0.96)


def test_snapshot_path_and_bad_files(tmp_path):
    assert snapshot_path("tests/test_x.py", "test_y[a/b]", "c") == (
        tmp_path.__class__("tests/__erf_snapshots__/test_x/test_y[a_b].c.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_snapshot(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for content, message in [("{", "not valid JSON"), ("{}", "not an erf-tools snapshot"),
                             (json.dumps({"erf_snapshot": 99}), "newer erf-tools"),
                             (json.dumps({"erf_snapshot": 1, "settings": {}}), "lacks its 'fields'"),
                             (json.dumps({"erf_snapshot": 1, "settings": {}, "fields": {"a": 1}}), "a field must be")]:
        bad.write_text(content)
        with pytest.raises(SnapshotError, match=message):
            read_snapshot(bad)


# ------------------------------------------------------------------------------------------------------ tolerances
def test_allowed_difference_rules():
    a, b = FieldValue(1.0, (0.97, 1.03)), FieldValue(1.1, (1.06, 1.14))  # half-widths 0.03 and 0.04
    assert allowed_difference(a, b) == (pytest.approx(0.05), "noise")
    assert allowed_difference(a, b, factor=2.0)[0] == pytest.approx(0.10)
    assert allowed_difference(a, FieldValue(1.1)) == (pytest.approx(0.03 * math.sqrt(2)), "noise (one side)")
    assert allowed_difference(FieldValue(200.0), FieldValue(100.0)) == (pytest.approx(FALLBACK_RTOL * 200 + 1e-9),
                                                                        "numeric")
    assert allowed_difference(a, b, tolerance=0.2) == (0.2, "tolerance")
    results = {r.name: r for r in compare_fields(
        {"x": a, "u": FieldValue(None), "v": FieldValue(2.0), "w": FieldValue(None)},
        {"x": b, "u": FieldValue(None), "v": FieldValue(None), "w": FieldValue(3.0), "new": FieldValue(1.0)},
        tolerances={"x": 0.2})}
    assert results["x"].ok and results["x"].rule == "tolerance" and results["x"].difference == pytest.approx(0.1)
    assert results["u"].ok and not results["v"].ok and not results["w"].ok  # undefined on one side only fails
    assert results["new"].ok and results["new"].rule == "not in snapshot"
    assert not compare_fields({"x": a}, {"x": b})[0].ok  # 0.1 > 0.05
    with pytest.raises(ValueError, match="unknown field 'y'"):
        compare_fields({"x": a}, {"x": b}, tolerances={"y": 1})
    with pytest.raises(ValueError, match="non-negative number"):
        compare_fields({"x": a}, {"x": b}, tolerances={"x": -1})


def test_settings_changes_and_map_correlation():
    changes = settings_changes({"a": 1, "b": {"c": [64, 64], "d": "x"}}, {"a": 1.0, "b": {"c": [96, 96]}, "e": 2})
    assert [c.describe() for c in changes] == ["b.c: [64, 64] → [96, 96]", "b.d: x → (none)", "e: (none) → 2"]
    m = SnapshotMap(((0.0, 1.0), (0.5, 0.2)), 1)
    assert map_correlation(m, m) == pytest.approx(1.0)
    assert map_correlation(m, SnapshotMap(((1.0, 0.0), (0.5, 0.8)), 1)) == pytest.approx(-1.0)
    assert map_correlation(m, SnapshotMap(((1.0,),), 1)) is None


def test_comparison_verdicts_and_message(tmp_path):
    stored = snapshot()
    assert compare_snapshots(stored, snapshot()).status == "pass"
    moved = snapshot(fields={"agd_score": FieldValue(0.80, (0.78, 0.82)), "sigma_major": FieldValue(None)})
    comparison = compare_snapshots(stored, moved)
    assert comparison.status == "regression" and [f.name for f in comparison.failed] == ["agd_score"]
    text = format_comparison(comparison, title="T", update_command="pytest t.py::x --erf-update")
    row = next(line for line in text.splitlines() if line.strip().startswith("agd_score")).split()
    assert row == ["agd_score", "0.9512", "0.8", "-0.151", "0.025", "FAIL"]  # √(0.015² + 0.02²) = 0.025
    assert "if the change is intended, rewrite the snapshot: pytest t.py::x --erf-update" in text
    changed = compare_snapshots(stored, snapshot(settings={**stored.settings, "input_size": [96, 96]}, fields={}))
    assert changed.status == "settings changed" and changed.failed == []  # numbers not compared
    assert "input_size: [64, 64] → [96, 96]" in format_comparison(changed, title="T")

    path = tmp_path / "s.json"
    outcome = check_snapshot(stored, path, update_command="U")
    assert outcome.status == "missing snapshot" and outcome.message.endswith("create it with:\n    U")
    assert check_snapshot(stored, path, update=True).status == "written"
    assert check_snapshot(stored, path, update=True).status == "unchanged"
    outcome = check_snapshot(moved, path, figure_dir=tmp_path / "fig")
    assert outcome.status == "regression" and outcome.figure.is_file()


# ------------------------------------------------------------------------------------------- synthetic ERF, truth
def test_report_fields_and_centre_noise_on_a_gaussian():
    stack = gaussian_stack()
    result = Result(stack, input_size=(128, 128))  # a 64-px map of a 128-px input: centre (c + ½)·2 − ½
    report = analyze(result, bootstrap=30).to_dict()
    extra = centre_intervals(result, n_resamples=30)
    fields = report_fields(report, extra_intervals=extra)
    assert fields["centre_y"].value == pytest.approx(2 * 30.0 + 0.5, abs=0.05)
    assert fields["centre_x"].value == pytest.approx(2 * 33.0 + 0.5, abs=0.05)
    assert fields["sigma_major"].value == pytest.approx(12.0, rel=0.02)  # σ = 6 map px = 12 input px
    assert fields["sigma_minor"].value == pytest.approx(8.0, rel=0.02)
    assert fields["agd_score"].value > 0.9 and fields["agd_score"].half_width is not None
    for name in ("centre_y", "centre_x"):
        low, high = fields[name].interval
        assert low - 0.05 <= fields[name].value <= high + 0.05 and high - low < 0.5
    report["agd_score_raw"] = 0.5  # a future score with an interval of its own name is compared too
    report["confidence_intervals"]["agd_score_raw"] = [0.4, 0.6]
    assert report_fields(report)["agd_score_raw"] == FieldValue(0.5, (0.4, 0.6))
    assert report_fields(report, fields=["r(0.5)"])["r(0.5)"].value is not None
    with pytest.raises(ValueError, match="unknown field"):
        report_fields(report, fields=["nope"])


def test_centre_noise_with_block_summed_per_image_maps():
    stack = gaussian_stack(side=64)
    blocks = stack.reshape(8, 32, 2, 32, 2).sum(axis=(2, 4))
    low, high = centre_intervals(Result(blocks, input_size=(64, 64), down=2), n_resamples=30)["centre_y"]
    assert low - 0.3 <= 30.0 <= high + 0.3
    assert centre_intervals(Result(stack[:1]), n_resamples=30) == {}


def test_assert_agd_on_known_maps():
    gaussian = analyze(gaussian_stack(), bootstrap=0)
    assert_agd(gaussian, at_least=0.9, sigma_between=(3, 8), centre_within=4)  # σ 6 and 4, 2.1 px off centre
    assert_agd(gaussian.to_dict(), at_least=0.9)  # a saved report dict works too
    with pytest.raises(ERFAssertionError) as info:
        assert_agd(gaussian, at_least=0.9, sigma_between=(5, 8), centre_within=1)
    text = str(info.value)
    assert text.startswith("ERF expectations not met (2 of 5: sigma_minor, centre offset)")
    assert "sigma_minor    in [5, 8] px" in text and "≤ 1 px from the input centre" in text
    yy, xx = np.mgrid[:64, :64]
    disk = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 15**2).astype(float)
    with pytest.raises(ERFAssertionError, match=r"agd_score\s+≥ 0.9\s+0\.5\d+\s+FAIL"):
        assert_agd(analyze(disk, bootstrap=0), at_least=0.9, not_flagged=False)
    with pytest.raises(ERFAssertionError, match="not_gaussian"):
        assert_agd(analyze(disk, bootstrap=0))
    with pytest.raises(TypeError, match="expected an ERFResult"):
        assert_agd(3)
