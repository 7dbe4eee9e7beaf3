"""The fast paths of ``Preprocessing`` give torchvision's numbers bit for bit: the one-buffer normalisation, and a
uint8 array at the native size (synthetic images) taken without the PIL round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from erf_tools.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, normalised_tensor


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (224, 224), (375, 500)])
@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3)])
def test_normalised_tensor_is_to_tensor_then_normalize(shape, mean, std):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8))
    expected = TF.normalize(TF.to_tensor(image), list(mean), list(std))
    got = normalised_tensor(image, mean, std)
    assert got.dtype == torch.float32 and got.shape == expected.shape and torch.equal(got, expected)


def test_normalised_tensor_refuses_what_it_cannot_normalise():
    with pytest.raises(ValueError, match="std must not contain zeros"):
        normalised_tensor(Image.new("RGB", (4, 4)), (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match=r"expected an H×W×3 image, got shape \(4, 4\)"):
        normalised_tensor(Image.new("L", (4, 4)), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("preprocess", [
    Preprocessing(size=(224, 224)),
    Preprocessing(size=(240, 240), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3),
    Preprocessing(size=(224, 224), resize="resize_crop", crop_pct=0.875),
    Preprocessing(size=(200, 240), resize="resize_crop", crop_pct=0.9),
    Preprocessing(size=(97, 97), resize="resize_crop", crop_pct=0.95),
], ids=["warp", "warp-bilinear", "timm-crop", "timm-crop-oblong", "timm-crop-odd"])
def test_an_array_gives_the_numbers_of_its_pil_image(preprocess):
    rng = np.random.default_rng(1)
    height, width = preprocess.native_size()
    for shape in [(height, width, 3), (height + 3, width, 3), (height, width + 1, 3)]:  # native, then resampled
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = preprocess(Image.fromarray(array))
        got = preprocess(array)
        assert got.shape == expected.shape == (3, *preprocess.size) and torch.equal(got, expected)
        assert got.is_contiguous()
