"""erf_tools.analysis.agreement: per-pixel z² between two maps, its Gaussian expectation and the split null."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from erf_tools.analysis.agreement import block_sums, map_agreement, split_null, welch_expected_z2, z_squared


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


def _kim_like_maps(rng, n: int, sigma: float = 10.0) -> np.ndarray:
    """48×48 per-image maps like a Kim-protocol ERF's: a Gaussian envelope times squared clamped normals (half the
    pixels 0, a heavy right tail)."""
    yy, xx = np.mgrid[:48, :48]
    envelope = np.exp(-((yy - 23.5) ** 2 + (xx - 23.5) ** 2) / (2 * sigma ** 2))
    return envelope * np.maximum(rng.standard_normal((n, 48, 48)), 0.0) ** 2


def _rejections(rng, repetitions: int, sigma_second: float) -> dict[str, int]:
    """How often each test rejects at 5 %: 12 images of the second source against 60 of the first (12 against 48
    with the sized null, as map_agreement does), and the old design (all 60 against a null of 12 against 48)."""
    counts = {"pixels": 0, "blocks": 0, "missized": 0}
    for _ in range(repetitions):
        first, second = _result(_kim_like_maps(rng, 60)), _result(_kim_like_maps(rng, 12, sigma_second), "sample")
        first.receptive_field_centre = second.receptive_field_centre = (23.5, 23.5)
        agreement = map_agreement(first, second, null_repeats=20)
        counts["pixels"] += agreement["mean_z2"] > agreement["null_q95_z2"]
        counts["blocks"] += agreement["blocks"]["mean_z2"] > agreement["blocks"]["null_q95_z2"]
        counts["missized"] += agreement["mean_z2_raw"] > np.quantile(split_null(first, 12, repeats=20), 0.95)
    return counts


def test_the_sized_null_is_calibrated_and_the_missized_one_is_not():
    """Same distribution on both sides: the tests reject at about their level. Rejecting when the quantile of 20
    splits is exceeded happens with probability ≈ 1/21 + interpolation ≈ 0.07, so 100 repetitions give 7 ± 2.6; the
    bound 14 is that + 2.7 SD. Measured: 8 (per pixel) and 11 (blocks) of 100. The old design (null splits of 12
    against 48, statistic against all 60) rejected 98 of 100: z² grows with the larger side's count."""
    counts = _rejections(np.random.default_rng(0), 100, 10.0)
    assert counts["pixels"] <= 14 and counts["blocks"] <= 14
    assert counts["missized"] >= 40


def test_the_block_test_sees_a_ten_percent_wider_shape():
    """σ 11 px against 10 px from 12 images: the 8×8 block test rejects nearly always (measured 30 of 30), the
    per-pixel one less often than under agreement (0 of 30): its z² is dominated by the few images' noisy errors."""
    counts = _rejections(np.random.default_rng(1), 30, 11.0)
    assert counts["blocks"] >= 27


def test_block_sums_pad_the_edges_and_keep_the_total():
    maps = np.arange(2 * 10 * 10, dtype=np.float64).reshape(2, 10, 10)
    blocks = block_sums(maps, 4)
    assert blocks.shape == (2, 3, 3) and np.allclose(blocks.sum(axis=(1, 2)), maps.sum(axis=(1, 2)))
    assert blocks[0, 0, 0] == maps[0, :4, :4].sum() and blocks[0, 2, 2] == maps[0, 8:, 8:].sum()
    assert block_sums(maps, 1) is maps
    with pytest.raises(ValueError, match="positive"):
        block_sums(maps, 0)


def test_without_per_image_maps_there_is_no_null_and_mean_z2_is_the_raw_statistic():
    rng = np.random.default_rng(2)
    first, second = _result(_maps(rng, 48)), _result(_maps(rng, 12), "sample")
    first.per_image_maps = second.per_image_maps = None
    agreement = map_agreement(first, second)
    assert "null_mean_z2" not in agreement and "blocks" not in agreement
    assert agreement["mean_z2"] == agreement["mean_z2_raw"]
