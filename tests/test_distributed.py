"""Two CPU processes on the gloo backend give the result of one process, bit for bit.

The worker processes are started with ``torch.multiprocessing.spawn`` and meet through a file store; each measures
its shard (images rank, rank + 2, ...) and the exact accumulators are all-reduced. Both ranks save what they got;
the test compares them with a single-process run of the same images: maps, per-image maps, image order, counts and
rejected images. Every process (the reference run included) uses one thread, so that the per-image maps are
computed by the same kernels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from erf_tools import load_result, measure_erf, save_result
from erf_tools.engine.distributed import measure_erf_distributed, rank_partial_path


class NaNOnBrightImages(nn.Module):
    """Small conv net whose output is NaN for images whose top-left pixel exceeds 4 (to exercise rejection)."""

    erf_target = "body"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        poison = torch.where(x[:, :1, :1, :1] > 4, float("nan"), 1.0)
        return self.body(x * poison)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = NaNOnBrightImages().eval()
    with torch.no_grad():
        model.body[1].running_var.uniform_(0.5, 1.5)
    return model


def images() -> torch.Tensor:
    batch = torch.randn(7, 3, 20, 20, generator=torch.Generator().manual_seed(11))
    batch[4, 0, 0, 0] = 5.0  # image 4 (rank 0's third) gives NaN
    return batch


def _worker(rank: int, world: int, store: str, out: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = measure_erf_distributed(tiny_model(), images(), targets=["body.2", "body"], **kwargs)
        for index, single in enumerate(result):
            save_result(single, Path(out) / f"rank{rank}" / f"target{index}")
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, **kwargs) -> list[list]:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path), kwargs), nprocs=2, join=True)
    return [[load_result(tmp_path / f"rank{rank}" / f"target{index}") for index in range(2)] for rank in range(2)]


@pytest.mark.filterwarnings("ignore:.*NaN/Inf.*")
def test_two_gloo_processes_equal_one_process(tmp_path):
    kwargs = dict(protocol="replknet", batch_size=1)
    ranks = _run_two_ranks(tmp_path, **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = measure_erf(tiny_model(), images(), targets=["body.2", "body"], **kwargs)
    finally:
        torch.set_num_threads(threads)
    for results in ranks:
        for result, expected in zip(results, reference):
            assert np.array_equal(result.map, expected.map)
            assert np.array_equal(result.map_standard_error, expected.map_standard_error)
            assert np.array_equal(result.per_image_maps, expected.per_image_maps)
            assert result.image_ids == expected.image_ids == [f"tensor[{i}]" for i in (0, 1, 2, 3, 5, 6)]
            assert result.rejected_images == expected.rejected_images == ["tensor[4]"]
            assert (result.num_images, result.num_rejected) == (expected.num_images, expected.num_rejected) == (6, 1)
            assert result.centre_unit == expected.centre_unit and result.target == expected.target
            assert result.image_source == expected.image_source
            assert result.timing["engine"]["world_size"] == 2
        assert not any(tmp_path.glob("*.partial*"))


def test_rank_partial_paths_are_distinct():
    paths = {rank_partial_path("out/run.partial.npz", rank, 4) for rank in range(4)}
    assert len(paths) == 4 and Path("out/run.partial.rank2of4.npz") in paths


def test_without_a_process_group_it_is_a_single_process_run():
    model = tiny_model()
    alone = measure_erf_distributed(model, images()[:3], batch_size=3)
    reference = measure_erf(model, images()[:3], batch_size=3)
    assert np.array_equal(alone.map, reference.map)


@pytest.mark.filterwarnings("ignore:.*NaN/Inf.*")
def test_worker_threads_give_the_serial_result():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = measure_erf(tiny_model(), images(), batch_size=1, workers=2, targets=["body.2", "body"])
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)  # what each of the two workers had
        serial = measure_erf(tiny_model(), images(), batch_size=1, targets=["body.2", "body"])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(parallel, serial):
        assert np.array_equal(a.map, b.map) and np.array_equal(a.per_image_maps, b.per_image_maps)
        assert a.image_ids == b.image_ids and a.rejected_images == b.rejected_images == ["tensor[4]"]
    assert parallel[0].timing["engine"]["workers"] == 2
