"""Issue 7, library side: every bad input gets a clear error naming the problem; nothing computed is lost."""
from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from erf_tools import load_model, measure_erf
from erf_tools.engine.engine import ERFEngine
from erf_tools.images import ImageSourceError, iter_inputs, open_image_source, preprocessing_for
from erf_tools.protocols import resolve_options
from erf_tools.results import (
    SCHEMA_VERSION,
    ERFResult,
    ResultFileError,
    atomic_write_bytes,
    load_result,
    save_result,
)
from erf_tools.targets import TargetError, resolve_targets
from erf_tools.weights import CheckpointError, UnknownModelError, load_checkpoint


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).eval()


# --- models and targets ------------------------------------------------------------------------------------------


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet5O'.*did you mean .*resnet50"):
        load_model("resnet5O")


def test_pooled_target_is_refused(tiny):
    with pytest.raises(TargetError, match="no spatial feature map.*choose an earlier layer"):
        measure_erf(tiny, torch.randn(1, 3, 32, 32), targets="global_pool")


def test_input_smaller_than_the_total_stride(tiny):
    with pytest.raises(TargetError, match=r"16×16 input is smaller than the total stride 32 of target 'layer4'"):
        measure_erf(tiny, torch.randn(1, 3, 16, 16))


def test_stage_out_of_range(tiny):
    with pytest.raises(TargetError, match="out of range: the model has stages 0..3"):
        resolve_targets(tiny, "stage:7")


# --- checkpoints ---------------------------------------------------------------------------------------------------


def test_missing_checkpoint(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tiny, tmp_path / "nope.pth")


def test_not_a_checkpoint(tiny, tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tiny, path)


def test_truncated_checkpoint(tiny, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({"model": tiny.state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tiny, path)


class _Payload:
    """Unpickling this would run code: a checkpoint must never be loaded with weights_only=False."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_random_bytes_are_not_mistaken_for_code(tiny, tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tiny, path)


def test_result_files_are_ordinary_files(tiny, tmp_path):
    npz, js = save_result(_small_result(tiny), tmp_path / "erf")
    mask = os.umask(0)
    os.umask(mask)
    assert npz.stat().st_mode & 0o777 == 0o666 & ~mask
    assert js.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("container", ["plain pickle", "torch zip"])
def test_pickle_that_carries_code_is_refused(tiny, tmp_path, container):
    path = tmp_path / "evil.pth"
    if container == "torch zip":
        torch.save({"model": _Payload()}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"model": _Payload()}, handle)
    with pytest.raises(CheckpointError, match=r"refused .*carries code \(posix.system"):
        load_checkpoint(tiny, path)


def test_wrong_architecture_lists_missing_unexpected_and_shapes(tiny, tmp_path):
    other = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny, path)
    message = str(info.value)
    assert "does not match the ResNet architecture" in message
    assert "missing keys" in message and "unexpected keys" in message and "shape mismatches" in message


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_ema", "module."])
def test_official_wrappers_load(tiny, tmp_path, wrapper):
    state = tiny.state_dict()
    payload = {f"module.{k}": v for k, v in state.items()} if wrapper == "module." else {wrapper: state, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    fresh = timm.create_model("test_resnet", pretrained=False)
    info = load_checkpoint(fresh, path)
    assert info.source == "checkpoint"
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key])


def test_training_checkpoint_with_args_namespace_loads(tiny, tmp_path):
    import argparse

    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": tiny.state_dict(), "epoch": 299, "args": argparse.Namespace(model="x", lr=4e-3)}, path)
    fresh = timm.create_model("test_resnet", pretrained=False)
    assert load_checkpoint(fresh, path).source == "checkpoint"
    assert torch.equal(fresh.fc.weight, tiny.fc.weight)


def test_checkpoint_with_another_head_size_loads(tiny, tmp_path):
    model22k = timm.create_model("test_resnet", pretrained=False, num_classes=21841)
    path = tmp_path / "in22k.pth"
    torch.save({"model": model22k.state_dict()}, path)
    fresh = timm.create_model("test_resnet", pretrained=False)
    load_checkpoint(fresh, path)
    assert fresh.fc.out_features == 21841


# --- images --------------------------------------------------------------------------------------------------------


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist"):
        open_image_source(tmp_path / "absent")
    with pytest.raises(ImageSourceError, match="contains no image files"):
        open_image_source(tmp_path)


def _write_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a_rgb.png")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(folder / "b_grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(folder / "d_16bit.png")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / "sub" / "e.jpg")
    (folder / "f_corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")


def test_mixed_folder_decodes_every_mode_and_counts_corrupt_files(tmp_path):
    _write_images(tmp_path)
    source = open_image_source(tmp_path)
    preprocess = preprocessing_for("replknet", None, 32)
    with pytest.warns(UserWarning, match="skipped 'f_corrupt.jpg'"):
        items = list(iter_inputs(source, preprocess))
    assert [i for i, _ in items] == ["a_rgb.png", "b_grey.png", "c_rgba.png", "d_16bit.png", "sub/e.jpg"]
    assert all(t.shape == (3, 32, 32) and torch.isfinite(t).all() for _, t in items)
    assert [s[0] for s in source.skipped] == ["f_corrupt.jpg"]
    assert items[3][1].std() > 0.1  # 16-bit data is rescaled, not clipped to white


def test_folder_of_only_corrupt_files_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    source = open_image_source(tmp_path)
    with pytest.raises(ImageSourceError, match="no readable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(iter_inputs(source, preprocessing_for("replknet", None, 32)))


def test_measure_reports_skipped_files(tiny, tmp_path):
    _write_images(tmp_path)
    with pytest.warns(UserWarning, match="skipped"):
        result = measure_erf(tiny, tmp_path, input_size=64, batch_size=2)
    assert result.num_images == 5
    assert result.image_source["skipped"][0][0] == "f_corrupt.jpg"


def test_bad_tensor_inputs(tiny):
    with pytest.raises(ValueError, match="N×3×H×W"):
        measure_erf(tiny, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="float tensor"):
        measure_erf(tiny, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# --- numerics and memory -----------------------------------------------------------------------------------------


def test_all_nan_images_give_a_zero_map_and_a_warning():
    class AlwaysNaN(nn.Module):
        erf_target = "conv"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x * float("nan"))

    with pytest.warns(UserWarning, match="no valid image"):
        result = measure_erf(AlwaysNaN(), torch.randn(2, 3, 8, 8))
    assert result.num_images == 0 and result.num_rejected == 2 and not result.map.any()


def test_out_of_memory_falls_back_to_smaller_batches(tiny, monkeypatch):
    real = ERFEngine.compute_batch
    sizes = []

    def flaky(self, batch):
        sizes.append(batch.shape[0])
        if batch.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = measure_erf(tiny, images, batch_size=8)
    monkeypatch.setattr(ERFEngine, "compute_batch", flaky)
    with pytest.warns(UserWarning, match="out of memory at batch size 8"):
        result = measure_erf(tiny, images, batch_size=8)
    assert sizes[:3] == [8, 4, 2]
    np.testing.assert_allclose(result.map, reference.map, rtol=1e-5, atol=1e-5 * reference.map.max())


# --- results -------------------------------------------------------------------------------------------------------


def _small_result(tiny) -> ERFResult:
    return measure_erf(tiny, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def test_result_round_trip(tiny, tmp_path):
    result = _small_result(tiny)
    save_result(result, tmp_path / "run" / "erf")
    loaded = load_result(tmp_path / "run" / "erf.json")
    np.testing.assert_array_equal(loaded.map, result.map)
    np.testing.assert_array_equal(loaded.per_image_maps, result.per_image_maps)
    assert loaded.metadata() == result.metadata()


def test_truncated_or_corrupt_result_files(tiny, tmp_path):
    result = _small_result(tiny)
    npz, js = save_result(result, tmp_path / "erf")
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(ResultFileError, match="truncated or corrupt"):
        load_result(tmp_path / "erf")
    save_result(result, tmp_path / "erf")
    js.write_text(js.read_text()[:50])
    with pytest.raises(ResultFileError, match="not valid JSON"):
        load_result(tmp_path / "erf")
    with pytest.raises(ResultFileError, match="does not exist"):
        load_result(tmp_path / "other")


def test_newer_schema_is_refused(tiny, tmp_path):
    _, js = save_result(_small_result(tiny), tmp_path / "erf")
    meta = json.loads(js.read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    js.write_text(json.dumps(meta))
    with pytest.raises(ResultFileError, match="newer erf-tools"):
        load_result(js)


def test_unwritable_output_folder(tiny, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("a file where a folder should be")
        target = blocker / "erf"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "erf"
    with pytest.raises(OSError):
        save_result(_small_result(tiny), target)


def test_failed_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "keep.json"
    path.write_text("old contents")

    def disk_full(handle):
        handle.write(b"partial new contents")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, disk_full)
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]  # no temporary file left behind


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 12), width=st.integers(1, 12), per_image=st.integers(0, 3), with_nan=st.booleans())
def test_result_io_round_trips_any_small_map(height, width, per_image, with_nan, tmp_path_factory):
    rng = np.random.default_rng(height * 100 + width)
    values = rng.random((height, width))
    if with_nan:
        values[0, 0] = np.nan
    result = ERFResult(
        map=values, per_image_maps=rng.random((per_image, height, width)).astype(np.float32),
        per_image_downsample=1, num_images=per_image, num_rejected=0, rejected_images=[], image_ids=[],
        target="t", feature_shape=(1, 1, 1), centre_unit=(0, 0), receptive_field_centre=None,
        total_stride=(1.0, 1.0), input_size=(height, width), model="m", protocol="replknet",
        options=resolve_options("replknet").to_dict(), weights={}, image_source={}, preprocessing={},
    )
    folder = tmp_path_factory.mktemp("io")
    save_result(result, folder / "r")
    loaded = load_result(folder / "r")
    np.testing.assert_array_equal(loaded.map, values)
    assert loaded.metadata() == result.metadata()
