"""timm's own families: torchvision ResNet checkpoints load into timm ResNets, and the ERF layer is ``layer4``."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from erf_tools.targets import default_target
from erf_tools.weights import load_checkpoint


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_checkpoint_loads_into_timm(name, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    path = tmp_path / f"{name}-torchvision.pth"
    torch.save(reference.state_dict(), path)  # torchvision's files are bare state dicts
    model = timm.create_model(name, pretrained=False)
    load_checkpoint(model, path, strict=True)
    model.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        torch.testing.assert_close(model.forward_features(x), torch.nn.Sequential(*list(reference.children())[:-2])(x))
    assert default_target(model) == "layer4"


@pytest.mark.parametrize("name", ["resnet101", "resnet152"])
def test_deep_resnets_default_to_layer4(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert default_target(model) == "layer4"
