"""batch_size="auto": the throughput tuner's schedule and choice, and its record in a measurement."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from erf_tools import measure_erf
from erf_tools.engine.batch_tuning import ThroughputTuner
from erf_tools.engine.scheduling import batches


def run_schedule(tuner: ThroughputTuner, seconds_per_image: dict[int, float], batches_run: int) -> list[int]:
    """Hand out ``batches_run`` sizes, recording for each the time the table gives (in issue order)."""
    sizes = []
    for index in range(batches_run):
        size = tuner.next_size()
        sizes.append(size)
        tuner.record(index, size, size * seconds_per_image[size])
    return sizes


def test_tuner_doubles_until_clearly_slower_and_settles_on_the_fastest():
    # per-image time falls to batch 4, is 20 % worse at 8: trials 1, 2, 4, 8, then 4 for the rest (16 never tried)
    speed = {1: 1.0, 2: 0.6, 4: 0.5, 8: 0.6, 16: 0.4}
    tuner = ThroughputTuner(cap=16)
    assert run_schedule(tuner, speed, 8) == [1, 1, 2, 4, 8, 4, 4, 4]
    assert tuner.best == 4 and tuner.to_dict()["seconds_per_image"] == {"1": 1.0, "2": 0.6, "4": 0.5, "8": 0.6}


def test_tuner_goes_on_through_a_flat_stretch():
    speed = {1: 1.0, 2: 1.02, 4: 1.05, 8: 0.7, 16: 1.2}  # ties (noise) up to 4, then faster at 8
    tuner = ThroughputTuner(cap=16)
    assert run_schedule(tuner, speed, 8) == [1, 1, 2, 4, 8, 16, 8, 8]
    assert tuner.best == 8


def test_tuner_settles_on_the_smallest_batch_within_five_percent_of_the_fastest():
    speed = {1: 2.0, 2: 2.1, 4: 1.82, 8: 1.72, 16: 1.69, 32: 1.9}  # 8 is 1.8 % slower than 16: same speed, half memory
    tuner = ThroughputTuner(cap=32)
    assert run_schedule(tuner, speed, 9) == [1, 1, 2, 4, 8, 16, 32, 8, 8]
    assert tuner.best == 8


def test_tuner_respects_the_cap_and_ignores_probe_and_short_batches():
    tuner = ThroughputTuner(cap=3)
    speed = {1: 1.0, 2: 0.5, 3: 0.2}
    assert run_schedule(tuner, speed, 6) == [1, 1, 2, 3, 3, 3]
    assert tuner.best == 3
    short = ThroughputTuner(cap=8)
    short.next_size(), short.next_size()
    short.record(0, 1, 100.0)  # the probe batch: never compared
    short.record(1, 1, 1.0)
    short.next_size()
    short.record(2, 1, 0.01)  # a short last batch (1 image of 2): ignored
    assert short.trials == {1: 1.0}
    with pytest.raises(ValueError, match="cap"):
        ThroughputTuner(cap=0)


def test_tuner_sizes_issued_ahead_of_their_times_are_still_compared():
    tuner = ThroughputTuner(cap=8)
    issued = [tuner.next_size() for _ in range(4)]  # a prefetch thread ran ahead: probe, 1, 2, 4
    assert issued == [1, 1, 2, 4]
    for index, (size, per_image) in enumerate(zip(issued, (9.0, 1.0, 1.2, 0.3))):
        tuner.record(index, size, size * per_image)
    assert tuner.stopped and tuner.best == 4  # 2 was slower (stop), but 4, already running, was fastest


def test_batches_take_their_sizes_from_a_function():
    stream = ((str(i), torch.full((3, 2, 2), float(i))) for i in range(7))
    sizes = iter([1, 2, 3, 5])
    got = [ids for ids, _ in batches(stream, lambda: next(sizes))]
    assert got == [["0"], ["1", "2"], ["3", "4", "5"], ["6"]]


def test_measure_erf_auto_batch_records_the_tuning_and_matches_a_fixed_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2))
    images = torch.randn(9, 3, 24, 24)
    auto = measure_erf(net, images, targets="2", memory_budget=2**34)
    fixed = measure_erf(net, images, targets="2", batch_size=9)
    engine = auto.timing["engine"]
    assert engine["auto_batch_size"] == "auto"
    tuning = engine["batch_size_tuning"]
    assert tuning["cap"] == 9 and engine["batch_size"] == tuning["chosen"]
    assert set(tuning["seconds_per_image"]) <= {"1", "2", "4", "8", "9"} and "1" in tuning["seconds_per_image"]
    torch.testing.assert_close(auto.map, fixed.map, rtol=1e-5, atol=1e-6 * float(abs(fixed.map).max()))
    largest = measure_erf(net, images, targets="2", batch_size="max", memory_budget=2**34)
    assert largest.timing["engine"]["batch_size"] == 9 and "batch_size_tuning" not in largest.timing["engine"]
