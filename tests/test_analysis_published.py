"""OpenERF's published pretrained maps against the reference table of agd-metrics.md §3 (computed there on the
sum-normalised map without floor subtraction: moments on the full canvas, Hellinger to the moment-matched Gaussian,
r_sq centred at (112, 112) without log, rank area at 50 %, L1 on the max-normalised map)."""
from pathlib import Path

import numpy as np
import pytest

from erf_tools.analysis import (analyze, area_ratio, checkerboard_indices, hellinger_to_moment_gaussian,
                                image_moments, mardia_kurtosis, rank_area)

MAPS = Path(__file__).parent / "fixtures" / "conformance" / "published_maps"

# timm tag: (mom σ maj, min), (COM x, y), β₂, Hellinger, r_sq 20/50/99 %, rank 50 %, L1
TABLE = {
    "resnet50.a1_in1k": ((52.0, 51.3), (103.1, 102.2), 6.79, 0.100, (9.5, 28.2, 97.3), 25.7, 0.025),
    "vit_small_patch16_224.augreg_in1k": ((69.8, 59.7), (104.2, 125.0), 5.94, 0.573, (16.5, 58.3, 99.1), 8.1, 0.007),
    "swin_tiny_patch4_window7_224.ms_in1k": ((60.2, 59.7), (110.0, 110.5), 6.85, 0.233, (6.9, 39.6, 99.1), 29.4,
                                             0.015),
}


def published(name: str) -> np.ndarray:
    return np.load(MAPS / f"OpenERF_{name}.npy")


@pytest.mark.parametrize("name", sorted(TABLE))
def test_reference_table_columns(name):
    (major, minor), (com_x, com_y), beta2, hellinger, r_sq, rank50, l1 = TABLE[name]
    erf = published(name)
    mom = image_moments(erf)
    assert (mom.sigma_major, mom.sigma_minor) == pytest.approx((major, minor), abs=0.051)
    assert (mom.centre[1], mom.centre[0]) == pytest.approx((com_x, com_y), abs=0.051)
    assert mardia_kurtosis(erf) == pytest.approx(beta2, abs=0.0051)
    assert hellinger_to_moment_gaussian(erf) == pytest.approx(hellinger, abs=0.00051)
    ratios = area_ratio(erf, (0.2, 0.5, 0.99), centre=(112, 112), transform="none")
    assert [a.percent for a in ratios] == pytest.approx(r_sq, abs=0.051)
    assert 100 * rank_area(erf, (0.5,))[0] == pytest.approx(rank50, abs=0.051)
    assert checkerboard_indices(erf)[0] == pytest.approx(l1, abs=0.00051)


def test_resnet50_report():
    report = analyze(published("resnet50.a1_in1k"), bootstrap=0)
    assert report.kim_fit.sigma_x == pytest.approx(60.1, abs=0.06)
    assert report.kim_fit.sigma_y == pytest.approx(60.5, abs=0.06)
    assert report.kim_fit.r_squared == pytest.approx(0.932, abs=6e-4)
    assert report.fit.ok and report.agd_score > 0.9
    assert "not_gaussian" not in report.flags
    assert report.shape["mardia_kurtosis_raw"] == pytest.approx(6.79, abs=0.0051)
    assert report.shape["hellinger_moment_gaussian_raw"] == pytest.approx(0.100, abs=0.00051)
    assert report.spread["rank_area_raw"][0.5] == pytest.approx(0.257, abs=0.00051)
    assert report.checkerboard["l1"] == pytest.approx(0.025, abs=0.00051)
    assert report.openerf_metrics["argmax_yx"] == [99, 98]
    # the ERF sits up-left of the image centre (agd-metrics.md §2.5)
    assert report.fit.centre[0] < 105 and report.fit.centre[1] < 105


def test_vit_augreg_is_flagged_not_gaussian_instead_of_a_huge_sigma():
    report = analyze(published("vit_small_patch16_224.augreg_in1k"), bootstrap=0)
    assert "not_gaussian" in report.flags
    assert not report.kim_fit.ok and "kim_fit:parameter_at_bound" in report.flags
    assert not report.fit.ok
    assert np.isnan(report.spread["sigma_major"]) and np.isnan(report.spread["sigma_minor"])
    assert report.to_dict()["spread"]["sigma_major"] is None
    assert report.agd_score < 0.5
