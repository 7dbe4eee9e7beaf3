"""Per-pixel second moments: the standard error of every pixel of a map, exact like the map itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from erf_tools import measure_erf
from erf_tools.engine.accumulate import SQUARES_GRID, ERFAccumulator, ExactSum
from erf_tools.protocols import resolve_options


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, stride=2, padding=1))
    net.erf_target = "4"
    return net


IMAGES = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("protocol", ["replknet", "kim2023", "luo2016"])
def test_standard_error_is_the_per_image_spread_over_root_n_in_the_map_units(protocol):
    result = measure_erf(small_net(), IMAGES, protocol=protocol, batch_size=4, input_size=None,
                         preprocessing="none")
    stack = result.per_image_maps.astype(np.float64)  # full resolution at 32 px
    assert result.per_image_downsample == 1 and result.num_independent_images == 9
    mean_se = stack.std(axis=0, ddof=1) / np.sqrt(len(stack))
    # the map is the mean (RepLKNet, Luo) or the sum normalised to 1 (Kim): its error scales the same way
    scale = (result.map.max() / stack.mean(axis=0).max()) if protocol != "kim2023" else 1 / stack.mean(axis=0).sum()
    np.testing.assert_allclose(result.map_standard_error, mean_se * scale, rtol=1e-6, atol=1e-12 * mean_se.max())


def test_standard_error_does_not_depend_on_how_the_maps_are_grouped():
    maps = torch.rand(9, 6, 7, generator=torch.Generator().manual_seed(4)) ** 3
    options = resolve_options("replknet")
    whole, pieces = ERFAccumulator((6, 7)), ERFAccumulator((6, 7))
    whole.add(maps, [str(i) for i in range(9)])
    other = ERFAccumulator((6, 7))
    pieces.add(maps[:2], ["0", "1"])
    other.add(maps[2:], [str(i) for i in range(2, 9)])
    pieces.merge(other)
    assert np.array_equal(whole.standard_error(options), pieces.standard_error(options))


def test_squares_are_exact_whatever_the_order():
    generator = torch.Generator().manual_seed(0)
    maps = (torch.rand(40, 5, 6, generator=generator) * 10.0 ** torch.randint(-30, 10, (40, 1, 1),
                                                                              generator=generator)).float()
    squares = maps.double().square()
    forward, backward = ExactSum((5, 6), SQUARES_GRID), ExactSum((5, 6), SQUARES_GRID)
    forward.add(squares)
    for index in reversed(range(40)):
        backward.add(squares[index:index + 1])
    assert np.array_equal(forward.value(), backward.value())
    exact = np.array([[sum(float(v) for v in column) for column in row] for row in squares.permute(1, 2, 0).tolist()])
    np.testing.assert_allclose(forward.value(), exact, rtol=1e-15)


def test_repeated_crops_count_once_and_widen_the_error():
    accumulator = ERFAccumulator((2, 2))
    accumulator.add(torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[3.0, 2.0], [1.0, 0.0]]]), ["a", "b"])
    options = resolve_options("replknet")
    independent = accumulator.standard_error(options, independent=2)
    repeated = accumulator.standard_error(options, independent=1)
    np.testing.assert_allclose(repeated, independent * np.sqrt(2))
    np.testing.assert_allclose(independent, [[1.0, 0.0], [1.0, 2.0]])  # |a − b| / 2


def test_sample_photographs_beyond_twelve_are_not_independent():
    result = measure_erf(small_net(), "sample", num_images=14, input_size=32, batch_size=7)
    assert result.num_images == 14 and result.num_independent_images == 12


def test_a_bare_total_has_no_standard_error():
    accumulator = ERFAccumulator((2, 2))
    accumulator.total = np.ones((2, 2))
    accumulator.count = 5
    assert accumulator.standard_error(resolve_options("replknet")) is None


@pytest.mark.slow
def test_num_images_auto_adds_images_until_the_agd_interval_is_narrow():
    from erf_tools.analysis import analyze

    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    loose = measure_erf(small_net(), images, num_images="auto", until_half_width=0.5, max_images=64, batch_size=8,
                        input_size=None, preprocessing="none")
    record = loose.timing["engine"]["until_converged"]
    assert record["converged"] and loose.num_images == record["images"] == 16  # met at the first check
    assert loose.image_source["num_images"] == 16
    tight = measure_erf(small_net(), images, num_images="auto", until_half_width=1e-6, max_images=40, batch_size=8,
                        input_size=None, preprocessing="none")
    record = tight.timing["engine"]["until_converged"]
    assert not record["converged"] and tight.num_images == 40
    assert [check["images"] for check in record["checks"]] == [16, 24, 40]
    low, high = analyze(loose, bootstrap=100, seed=0).interval("agd_score")
    assert (high - low) / 2 <= 0.5
    with pytest.raises(ValueError, match="'auto'"):
        measure_erf(small_net(), images, num_images="many")
