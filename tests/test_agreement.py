"""erf_tools.analysis.agreement: per-pixel z² between two maps, its Gaussian expectation and the split null."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from erf_tools.analysis.agreement import map_agreement, split_null, welch_expected_z2, z_squared


def _result(maps: np.ndarray, kind: str = "synthetic") -> SimpleNamespace:
    n = len(maps)
    return SimpleNamespace(map=maps.sum(axis=0) / maps.sum(), per_image_maps=maps, num_images=n,
                           num_independent_images=n, map_standard_error=maps.std(axis=0, ddof=1) * np.sqrt(n)
                           / maps.sum(), receptive_field_centre=(15.5, 15.5), image_source={"kind": kind})


def _maps(rng, n: int, scale: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    shape = np.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / (2 * 6.0 ** 2))
    return scale * shape * rng.gamma(2.0, 1.0, size=(n, 32, 32))  # skewed, positive per-image values


def test_z_squared_is_the_squared_difference_over_the_summed_variances():
    z2 = z_squared(np.array([1.0, 2.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.0]),
                   np.array([1.0, 1.0, 0.0]))
    assert np.allclose(z2, [0.5, 4.0])  # the pixel with no error on either side is left out


def test_welch_expectation_is_above_one_and_tends_to_one():
    se = np.full(10, 0.1)
    assert welch_expected_z2(se, 12, se, 12) == pytest.approx(22 / 20)
    assert welch_expected_z2(se, 10_000, se, 10_000) == pytest.approx(1.0, abs=1e-3)


def test_maps_from_one_distribution_agree_and_a_changed_shape_does_not():
    rng = np.random.default_rng(0)
    many, few = _result(_maps(rng, 48)), _result(_maps(rng, 12, scale=3.0), kind="sample")  # contrast is ignored
    agreement = map_agreement(many, few, null_repeats=20)
    assert agreement["null_source"] == "synthetic" and agreement["n_second"] == 12
    assert agreement["mean_z2"] < 1.1 * agreement["null_q95_z2"]
    assert all(abs(v["z"]) < 3 for v in agreement["central_mass"].values())
    wider = _maps(rng, 12) ** 0.5  # a flatter shape
    assert map_agreement(many, _result(wider))["mean_z2"] > 2 * agreement["null_q95_z2"]


def test_split_null_refuses_crops_and_block_summed_maps():
    rng = np.random.default_rng(1)
    crops = _result(_maps(rng, 24))
    crops.num_independent_images = 12
    with pytest.raises(ValueError, match="independent"):
        split_null(crops, 6)
    coarse = _result(_maps(rng, 24))
    coarse.per_image_maps = coarse.per_image_maps[:, ::2, ::2]
    with pytest.raises(ValueError, match="full-resolution"):
        split_null(coarse, 6)
