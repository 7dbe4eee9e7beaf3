"""Inputs prepared on loader threads (``loader_threads``): the same batches, in the same order, as on one thread;
errors surface where the serial loop would raise them; a stopped run stops preparing."""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from erf_tools import measure_erf
from erf_tools.engine.scheduling import batches


def _thunk(i: int, ran: list[int] | None = None):
    def prepare() -> torch.Tensor:
        time.sleep(0.002 * ((7 * i) % 5))  # later items often finish first
        if ran is not None:
            ran.append(i)
        return torch.full((3, 2, 2), float(i))
    return prepare


def test_loader_threads_keep_the_order_and_the_batch_sizes():
    sizes = [1, 2, 3, 5, 8]
    got = {}
    for threads in (1, 3):
        size_iter = iter(sizes)
        stream = ((str(i), _thunk(i) if i % 4 else torch.full((3, 2, 2), float(i))) for i in range(13))
        got[threads] = [(ids, batch) for ids, batch in batches(stream, lambda: next(size_iter),
                                                               loader_threads=threads)]
    assert [ids for ids, _ in got[3]] == [ids for ids, _ in got[1]] == [
        ["0"], ["1", "2"], ["3", "4", "5"], ["6", "7", "8", "9", "10"], ["11", "12"]]
    for (_, serial), (_, threaded) in zip(got[1], got[3]):
        assert torch.equal(serial, threaded)
    assert [int(v) for _, b in got[3] for v in b[:, 0, 0, 0]] == list(range(13))


def test_an_error_while_preparing_is_raised_in_order_and_the_pool_stops():
    def broken() -> torch.Tensor:
        raise ValueError("image 5 is broken")

    ran: list[int] = []
    stream = ((str(i), broken if i == 5 else _thunk(i, ran)) for i in range(40))
    seen = []
    with pytest.raises(ValueError, match="image 5 is broken"):
        for ids, _ in batches(stream, 2, loader_threads=2):
            seen += ids
    assert seen == ["0", "1", "2", "3"]  # the batch holding image 5 is never formed
    assert len(ran) < 40  # items beyond the look-ahead (4 × threads) were never started
    assert not [t for t in threading.enumerate() if t.name.startswith("erf-loader")]


def test_stopping_early_cancels_what_was_not_started():
    ran: list[int] = []
    stream = ((str(i), _thunk(i, ran)) for i in range(100))
    first = next(batches(stream, 4, loader_threads=2))
    assert first[0] == ["0", "1", "2", "3"]
    # the generator is closed when it is dropped; the look-ahead bounds the work done
    assert len(ran) <= 4 + 4 * 2 + 2


def test_bad_loader_threads_are_refused():
    with pytest.raises(ValueError, match="loader_threads must be a positive integer, got 0"):
        list(batches(iter([]), 2, loader_threads=0))
    with pytest.raises(ValueError, match="loader_threads must be a positive integer"):
        measure_erf(nn.Conv2d(3, 2, 3, padding=1), "noise", num_images=1, input_size=8, loader_threads=-2)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2)).eval()


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_measurements_with_loader_threads_are_those_of_one_thread(source, tmp_path):
    """Synthetic images are generated on the loader threads, folder images resized there (decoding stays in order,
    so unreadable files are skipped exactly as before)."""
    images = source
    if source == "folder":
        from PIL import Image

        images = tmp_path / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for index in range(7):
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / f"{index}.png")
        (images / "2_broken.png").write_bytes(b"not an image")
    kwargs = dict(num_images=7, input_size=32, batch_size=3, targets="2")
    results = {}
    for threads in (1, 3):
        skips = pytest.warns(UserWarning, match="not a readable image") if source == "folder" else None
        with skips or contextlib.nullcontext():
            results[threads] = measure_erf(_net(), images, loader_threads=threads, prefetch=threads > 1, **kwargs)
    one, three = results[1], results[3]
    assert np.array_equal(one.map, three.map) and one.image_ids == three.image_ids and len(one.image_ids) == 7
    assert np.array_equal(np.asarray(one.per_image_maps), np.asarray(three.per_image_maps))
    assert three.timing["engine"]["loader_threads"] == 3 and "loader_threads" not in one.timing["engine"]


def test_a_shard_generates_only_its_own_synthetic_images(monkeypatch):
    import erf_tools.images as images_module

    made: list[int] = []
    original = images_module.synthetic_image

    def counted(seed, index, *args, **kwargs):
        made.append(index)
        return original(seed, index, *args, **kwargs)

    monkeypatch.setattr(images_module, "synthetic_image", counted)
    result = measure_erf(_net(), "synthetic", num_images=6, input_size=16, batch_size=2, targets="2", shard=(1, 3))
    assert result.image_ids == ["synthetic[0:1]", "synthetic[0:4]"] and sorted(made) == [1, 4]
