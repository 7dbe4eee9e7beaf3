"""Golden regression values: AGD report headline numbers of seeded models at small inputs (tests/test_golden_scores.py).

Each case builds a timm model (``torch.manual_seed(0)``, ``pretrained=False``), re-draws it with the all-branches-active
init (``erf_tools.weights.activate_branches(model, seed=0)``), measures its ERF with the RepLKNet protocol on a seeded
``torch.randn`` input batch (``torch.Generator().manual_seed(0)``), and analyses it (``analyze(result, bootstrap=0)``).
Stored: the AGD score (noise-free estimate) and the raw AGD score of the map as measured, the fitted σ (major/minor, from the full-covariance fit, flagged or not), R², Mardia β₂ of the
floor-removed map, r(0.5), plus the map's sum and max (to tell an engine change from an analysis change).

Regenerate after an intended change (and say why in the commit):

    .venv/bin/python -m tests.regenerate_golden              # every case
    .venv/bin/python -m tests.regenerate_golden resnet18     # only the cases named
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "fixtures" / "golden_scores.json"

# (model, input side, number of images); ParC models only accept 224×224
CASES = [
    ("resnet18", 64, 4),
    ("uniconvnet_a", 64, 4),
    ("replknet_13", 64, 4),
    ("conv2former_n", 64, 4),
    ("parc_convnext_xt", 224, 2),
]
PROTOCOL = "replknet"
TOLERANCE = {"rtol": 1e-4, "atol": 1e-9}
NUMBERS = ("agd_score", "agd_score_raw", "sigma_major", "sigma_minor", "r_squared", "beta2", "r_0.5", "map_sum", "map_max")


def compute(model_name: str, size: int, images: int) -> dict:
    """The golden numbers of one case (see the module docstring)."""
    import timm
    import torch

    from erf_tools import measure_erf
    from erf_tools.analysis import analyze
    from erf_tools.weights import activate_branches

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    activate_branches(model, seed=0)
    model.eval()
    inputs = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning: these are architecture probes by design
        result = measure_erf(model, inputs, protocol=PROTOCOL)
    report = analyze(result, bootstrap=0)
    half = next(a for a in report.area_ratios if a.threshold == 0.5)
    return {
        "agd_score": report.agd_score,
        "agd_score_raw": report.agd_score_raw,
        "sigma_major": report.fit.sigma_major,
        "sigma_minor": report.fit.sigma_minor,
        "r_squared": report.fit.r_squared,
        "beta2": report.shape["mardia_kurtosis"],
        "r_0.5": half.ratio,
        "map_sum": float(np.sum(result.map)),
        "map_max": float(np.max(result.map)),
        "flags": list(report.flags),
        "target": result.target,
    }


def case_key(model_name: str, size: int, images: int) -> str:
    return f"{model_name}@{size}x{size}/{images}img"


def main(argv: list[str]) -> None:
    import timm
    import torch

    wanted = set(argv)
    data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    cases = data.get("cases", {})
    for name, size, images in CASES:
        if wanted and name not in wanted:
            continue
        key = case_key(name, size, images)
        print(f"computing {key} ...", flush=True)
        cases[key] = compute(name, size, images)
    data = {
        "description": __doc__.split("\n\n")[0],
        "protocol": PROTOCOL,
        "init": "torch.manual_seed(0); timm.create_model(name, pretrained=False); activate_branches(model, seed=0)",
        "inputs": "torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))",
        "analysis": "erf_tools.analysis.analyze(result, bootstrap=0)",
        "tolerance": TOLERANCE,
        "numbers": list(NUMBERS),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__},
        "regenerate": ".venv/bin/python -m tests.regenerate_golden [model ...]",
        "cases": cases,
    }
    GOLDEN.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main(sys.argv[1:])
