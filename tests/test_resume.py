"""Long runs checkpoint their accumulators and resume to the very same map.

An interrupted run (an exception from the progress callback, or a hard kill that leaves no chance to save) loses at
most ``checkpoint_every`` images, and resuming gives a map bit-identical to an uninterrupted run: the sums are exact
(``ExactSum``) and batches restart at the same boundaries.
"""
from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from erf_tools import measure_erf
from erf_tools.engine.accumulate import ERFAccumulator, ExactSum


class SmallNet(nn.Module):
    """A few convolutions with BN and ReLU: cheap, and every pixel of a 24×24 input matters."""

    erf_target = "body"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=2, dilation=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet().eval()
    with torch.no_grad():
        model.body[1].running_var.uniform_(0.5, 1.5)
        model.body[1].running_mean.normal_(0, 0.1)
    return model


IMAGES = torch.randn(10, 3, 24, 24, generator=torch.Generator().manual_seed(3))


class Stop(Exception):
    pass


def _assert_identical(resumed, reference) -> None:
    assert np.array_equal(resumed.map, reference.map)
    assert np.array_equal(resumed.map_standard_error, reference.map_standard_error)
    assert np.array_equal(resumed.per_image_maps, reference.per_image_maps)
    assert resumed.image_ids == reference.image_ids
    assert resumed.num_images == reference.num_images == 10


@pytest.mark.parametrize("protocol", ["replknet", "kim2023"])
def test_interrupted_by_the_progress_callback_then_resumed(tmp_path, protocol):
    model = small_net()
    reference = measure_erf(model, IMAGES, protocol=protocol, batch_size=2)
    partial = tmp_path / "run.partial.npz"
    seen_in_file = []

    def stop_at_six(done: int, total: int) -> None:
        if partial.is_file():
            with np.load(partial) as data:
                seen_in_file.append((done, int(data["processed"])))
        if done == 6:
            raise Stop

    with pytest.raises(Stop):
        measure_erf(model, IMAGES, protocol=protocol, batch_size=2, partial_path=partial, checkpoint_every=4,
                    progress=stop_at_six)
    # while running, the checkpoint on disk was never more than checkpoint_every images behind
    assert seen_in_file and all(done - saved < 4 for done, saved in seen_in_file)
    with np.load(partial) as data:
        assert int(data["processed"]) == 6  # saved again when the run stopped: nothing lost
    calls = []
    resumed = measure_erf(model, IMAGES, protocol=protocol, batch_size=2, partial_path=partial, checkpoint_every=4,
                          resume=True, progress=lambda done, total: calls.append(done))
    assert calls == [8, 10]  # only the remaining images were computed
    _assert_identical(resumed, reference)
    assert not partial.exists()  # a finished run removes its checkpoint


def _killed_run(partial: str) -> None:
    """Child process: measure, and kill itself with SIGKILL (no chance to save) after 7 of 10 images."""
    torch.set_num_threads(1)

    def kill_at_seven(done: int, total: int) -> None:
        if done >= 7:
            os.kill(os.getpid(), signal.SIGKILL)

    measure_erf(small_net(), IMAGES, batch_size=1, partial_path=partial, checkpoint_every=3, progress=kill_at_seven)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_hard_kill_loses_at_most_checkpoint_every_images(tmp_path):
    partial = tmp_path / "killed.partial.npz"
    process = multiprocessing.get_context("spawn").Process(target=_killed_run, args=(str(partial),))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    with np.load(partial) as data:
        saved = int(data["processed"])
    assert saved == 6 and 7 - saved <= 3  # checkpoints at 3 and 6; the 7th image is the only loss
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threading as the killed child
    try:
        reference = measure_erf(small_net(), IMAGES, batch_size=1)
        resumed = measure_erf(small_net(), IMAGES, batch_size=1, partial_path=partial, checkpoint_every=3,
                              resume=True)
    finally:
        torch.set_num_threads(threads)
    _assert_identical(resumed, reference)


def test_resume_from_an_image_source_skips_work_already_done(tmp_path):
    partial = tmp_path / "noise.partial.npz"
    kwargs = dict(num_images=5, input_size=24, seed=1, batch_size=2)
    reference = measure_erf(small_net(), "noise", **kwargs)

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_erf(small_net(), "noise", partial_path=partial, checkpoint_every=2, progress=stop, **kwargs)
    resumed = measure_erf(small_net(), "noise", partial_path=partial, resume=True, **kwargs)
    assert np.array_equal(resumed.map, reference.map) and resumed.image_ids == reference.image_ids


def test_resume_refuses_other_settings(tmp_path):
    partial = tmp_path / "p.npz"
    with pytest.raises(Stop):
        measure_erf(small_net(), IMAGES, batch_size=2, partial_path=partial, checkpoint_every=2,
                    progress=lambda d, t: (_ for _ in ()).throw(Stop()))
    with pytest.raises(ValueError, match="other settings"):
        measure_erf(small_net(), IMAGES, batch_size=2, partial_path=partial, resume=True, precision="bf16")


def test_exact_sum_does_not_depend_on_order_or_grouping():
    generator = torch.Generator().manual_seed(0)
    # magnitudes over 60 orders of magnitude, both signs, zeros: a float64 running sum would depend on the order
    maps = (torch.randn(40, 5, 7, generator=generator) *
            10.0 ** torch.randint(-30, 30, (40, 5, 7), generator=generator)).float()
    maps[maps.abs() < 1e-25] = 0
    forward, backward, grouped = ExactSum((5, 7)), ExactSum((5, 7)), ExactSum((5, 7))
    for single in maps:
        forward.add(single[None])
    for single in maps.flip(0):
        backward.add(single[None])
    halves = [ExactSum((5, 7)), ExactSum((5, 7))]
    halves[0].add(maps[1::2])
    halves[1].add(maps[0::2])
    grouped.merge(halves[1])
    grouped.merge(halves[0])
    assert np.array_equal(forward.value(), backward.value()) and np.array_equal(forward.value(), grouped.value())
    for bucket in forward.buckets:
        assert torch.equal(forward.buckets[bucket], grouped.buckets[bucket])
    # the value is the exact sum rounded to float64 (to one unit in the last place)
    import math

    exact = np.array([[math.fsum(maps[:, i, j].double().tolist()) for j in range(7)] for i in range(5)])
    assert np.all(np.abs(forward.value() - exact) <= np.spacing(np.abs(exact)))
    naive = np.zeros((5, 7))
    for single in maps.double().numpy()[::-1]:
        naive += single
    assert not np.array_equal(naive, exact)  # the order does matter for a plain float64 sum


def test_accumulator_state_round_trip_is_exact():
    accumulator = ERFAccumulator((3, 4), keep_per_image=True)
    maps = torch.rand(4, 3, 4, generator=torch.Generator().manual_seed(1)) * 1e-9
    maps[2, 0, 0] = float("nan")
    accumulator.add(maps, ["a", "b", "c", "d"])
    restored = ERFAccumulator((3, 4), keep_per_image=True)
    restored.load_state({k: np.asarray(v) for k, v in accumulator.state().items()})
    assert np.array_equal(restored.total, accumulator.total)
    assert np.array_equal(restored.squares.value(), accumulator.squares.value())
    assert restored.rejected == ["c"] and restored.rejected_positions == [2] and restored.positions == [0, 1, 3]
    assert restored.count == 3 and restored.processed == 4


def test_prefetching_and_lazy_shard_preprocessing_change_nothing(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not an image")  # skipped while decoding, in every shard
    kwargs = dict(input_size=24, batch_size=2)
    with pytest.warns(UserWarning, match="not a readable image"):
        reference = measure_erf(small_net(), folder, **kwargs)
    with pytest.warns(UserWarning, match="not a readable image"):
        prefetched = measure_erf(small_net(), folder, prefetch=True, **kwargs)
    assert np.array_equal(prefetched.map, reference.map) and prefetched.image_ids == reference.image_ids
    shards = []
    for rank in range(2):
        with pytest.warns(UserWarning, match="not a readable image"):
            shards.append(measure_erf(small_net(), folder, shard=(rank, 2), **kwargs))
    assert shards[0].image_ids == reference.image_ids[0::2] and shards[1].image_ids == reference.image_ids[1::2]
    assert shards[0].image_source["skipped"] == reference.image_source["skipped"] != []
