"""Golden regression values of measure_erf + analyze on seeded models (see tests/regenerate_golden.py).

A failure means the ERF engine, a model family or the analysis changed its numbers. If the change is intended,
regenerate with ``.venv/bin/python -m tests.regenerate_golden [model ...]`` and say why in the commit; ``map_sum`` /
``map_max`` tell an engine or model change (they move too) from an analysis change (they do not).
"""
import json

import numpy as np
import pytest

from tests.regenerate_golden import CASES, GOLDEN, NUMBERS, case_key, compute

GOLDEN_DATA = json.loads(GOLDEN.read_text())


def _params():
    for name, size, images in CASES:
        marks = [] if name == "resnet18" else [pytest.mark.slow]
        yield pytest.param(name, size, images, marks=marks, id=case_key(name, size, images))


@pytest.mark.parametrize("name,size,images", list(_params()))
def test_golden_scores(name, size, images):
    expected = GOLDEN_DATA["cases"].get(case_key(name, size, images))
    if expected is None:
        pytest.fail(f"no golden values for {case_key(name, size, images)}: run python -m tests.regenerate_golden {name}")
    got = compute(name, size, images)
    tol = GOLDEN_DATA["tolerance"]
    mismatches = {}
    for key in NUMBERS:
        want, have = expected[key], got[key]
        if want is None or have is None:
            ok = want is None and (have is None or not np.isfinite(have))
        else:
            ok = bool(np.isclose(have, want, rtol=tol["rtol"], atol=tol["atol"]))
        if not ok:
            mismatches[key] = (want, have)
    assert not mismatches, f"{case_key(name, size, images)} (expected, got): {mismatches}"
