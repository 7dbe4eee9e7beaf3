"""Peak-memory estimates and the automatic batch size.

The estimate replays an engine batch on the meta device; it must equal the same tracker run on real tensors (the
replay is faithful), grow linearly with the batch, shrink when the forward stops earlier, and the batch size it
picks must be the largest that fits the budget.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from erf_tools import measure_erf
from erf_tools.engine.engine import ERFEngine, frozen_eval
from erf_tools.engine.memory import LiveMemoryTracker, auto_batch_size, estimate_peak_memory, per_image_memory
from erf_tools.protocols import resolve_options
from erf_tools.targets import resolve_targets


class Net(nn.Module):
    erf_target = "deep"

    def __init__(self) -> None:
        super().__init__()
        self.shallow = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.deep = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deep(self.shallow(x)))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def test_meta_replay_equals_the_real_peak(net):
    estimate = estimate_peak_memory(net, 40, batch_size=3)
    engine = ERFEngine(net, resolve_targets(net, None), resolve_options("replknet"), "cpu", "fp32", False)
    tracker = LiveMemoryTracker()
    with frozen_eval(net), tracker:
        engine.compute_batch(torch.zeros(3, 3, 40, 40))
    assert abs(estimate - tracker.peak) <= 1024  # the same tensors, up to a few scalars
    # the activations alone set a floor: input + 16-channel map at full size, kept for the backward
    assert estimate > 3 * 4 * 40 * 40 * (3 + 16)


def test_peak_is_linear_in_the_batch_and_smaller_for_earlier_targets(net):
    estimate = per_image_memory(net, 40)
    assert estimate.method == "meta"
    assert estimate_peak_memory(net, 40, batch_size=5) == pytest.approx(estimate.peak(5), rel=0.02)
    shallow = per_image_memory(net, 40, targets="shallow")
    assert shallow.per_image < estimate.per_image
    bigger = per_image_memory(net, 80)
    assert bigger.per_image == pytest.approx(4 * estimate.per_image, rel=0.05)


def test_channels_last_and_bf16_estimates(net):
    fp32 = per_image_memory(net, 40)
    bf16 = per_image_memory(net, 40, precision="bf16")
    assert bf16.method == "fake"
    assert bf16.per_image <= fp32.per_image  # a float32 forward (the convolutions keep their weights, not their inputs)
    assert per_image_memory(net, 40, channels_last=True).per_image == pytest.approx(fp32.per_image, rel=0.1)
    assert all(not p.is_contiguous(memory_format=torch.channels_last) or p.dim() != 4 for p in net.parameters())


def test_auto_batch_size_is_the_largest_that_fits(net):
    estimate = per_image_memory(net, 40)
    for wanted in (1, 3, 7):
        budget = (estimate.fixed + wanted * estimate.per_image) / 0.85
        assert auto_batch_size(net, 40, int(budget) + 1) == wanted
        assert auto_batch_size(net, 40, int(budget) - estimate.per_image) == max(wanted - 1, 1)
    assert auto_batch_size(net, 40, 10) == 1  # not even one image fits: still 1 (the OOM fallback remains)
    assert auto_batch_size(net, 40, 2**40, max_batch_size=12) == 12


def test_measure_erf_with_the_largest_batch_that_fits(net):
    images = torch.randn(6, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    estimate = per_image_memory(net, 40)
    budget = int((estimate.fixed + 4 * estimate.per_image) / 0.85) + 1
    largest = measure_erf(net, images, batch_size="max", memory_budget=budget)
    fixed = measure_erf(net, images, batch_size=4)
    assert largest.timing["engine"]["batch_size"] == 4 and largest.timing["engine"]["auto_batch_size"] == "max"
    assert np.array_equal(largest.map, fixed.map)
    # by throughput, within half of the budget
    auto = measure_erf(net, images, batch_size="auto", memory_budget=2 * budget)
    assert auto.timing["engine"]["batch_size_tuning"]["cap"] == 4
    engine = fixed.timing["engine"]  # the first batch (probes, window checks) is timed apart from the steady state
    assert engine["first_batch_images"] == 4 and 0 < engine["first_batch_seconds"] <= fixed.timing["seconds"]
    capped = measure_erf(net, images[:2], batch_size="max", memory_budget=2**40)
    assert capped.timing["engine"]["batch_size"] == 2  # never more than the images there are
    with pytest.raises(ValueError, match="batch_size"):
        measure_erf(net, images, batch_size="big")


def test_estimate_falls_back_to_fake_tensors_for_operators_without_meta_kernels():
    """FFT depthwise convs (complex FFTs) have no meta kernels: the fp32 estimate replays with fake tensors."""
    from erf_tools.layers.fft_conv import use_fft_depthwise

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 31, padding=15, groups=8)).eval()
    model.erf_target = "1"
    direct = per_image_memory(model, 64)
    assert use_fft_depthwise(model, 27) == ["1"]
    fft = per_image_memory(model, 64)
    assert direct.per_image > 0 and fft.per_image > 0
