"""Golden regression values of measure_erf + analyze on seeded models, through erf-tools' own pytest plugin.

Each case builds a timm model (``torch.manual_seed(0)``, ``pretrained=False``), re-draws it with the all-branches-active
init (``activate_branches(model, seed=0)``), measures its ERF with the RepLKNet protocol on a seeded ``torch.randn``
batch (``torch.Generator().manual_seed(0)``) and analyses it without a bootstrap, so the numbers are compared
numerically (relative 1e-4: float rounding). The snapshots are in ``tests/__erf_snapshots__/test_golden_scores/``.

A failure means the ERF engine, a model family or the analysis changed its numbers. If the change is intended,
rewrite the snapshots and say why in the commit::

    python -m pytest tests/test_golden_scores.py --erf-update                 # every case
    python -m pytest "tests/test_golden_scores.py::test_golden_scores[resnet18@64x64/4img]" --erf-update

``map_sum``/``map_max`` tell an engine or model change (they move too) from an analysis change (they do not).
"""
import pytest

# (model, input side, number of images); ParC models only accept 224×224
CASES = [
    ("resnet18", 64, 4),
    ("uniconvnet_a", 64, 4),
    ("replknet_13", 64, 4),
    ("conv2former_n", 64, 4),
    ("parc_convnext_xt", 224, 2),
]
# The random-weight UniConvNet-A amplifies float32 rounding (its DCNv3 offsets feed sampling positions through 16
# blocks): the module as given differs between machines by up to 0.44 % in map_max, 0.2 % in map_sum, 0.0012 in
# agd_score and 0.008 px in the centre (measured: map_max 125.88 / 125.32 / 125.49 and map_sum 86982 / 87157 on two
# AMD EPYC hosts at 1 and 2 threads), far above rtol 1e-4. Its tolerances are about 4× that spread; the other
# cases agree to 1e-4 everywhere we measured.
CASE_TOLERANCES = {
    "uniconvnet_a": {"map_max": 1.3, "map_sum": 870.0, "agd_score": 0.005, "agd_score_raw": 0.001,
                     "r_squared": 0.002, "beta2": 0.005, "centre_y": 0.03, "centre_x": 0.03, "fit_sigma_major": 0.1,
                     "fit_sigma_minor": 0.1},
}
FIELDS = ["agd_score", "agd_score_raw", "fit_sigma_major", "fit_sigma_minor", "r_squared", "beta2", "r(0.5)", "centre_y", "centre_x",
          "map_sum", "map_max"]


def case_key(model_name: str, size: int, images: int) -> str:
    return f"{model_name}@{size}x{size}/{images}img"


def _params():
    for name, size, images in CASES:
        marks = [] if name == "resnet18" else [pytest.mark.slow]
        yield pytest.param(name, size, images, marks=marks, id=case_key(name, size, images))


@pytest.mark.parametrize("name,size,images", list(_params()))
def test_golden_scores(erf_regression, name, size, images):
    import timm
    import torch

    from erf_tools.weights import activate_branches

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    activate_branches(model, seed=0)
    inputs = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    # fast=False: the module as given. The exact fast paths (BN folding, re-parameterisation, channels-last) agree with
    # it to float32 rounding, which depends on the CPU's kernels (RepLKNet-13's map_max: 6e-4 apart between an Intel
    # and an AMD machine), too loose for map_sum/map_max; they have their own equality tests.
    erf_regression.check(model, images=inputs, protocol="replknet", bootstrap=0, fields=FIELDS, fast=False,
                         tolerances=CASE_TOLERANCES.get(name))
