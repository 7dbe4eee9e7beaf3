"""The Triton DCNv3 core against the grid_sample reference, in Triton's interpreter on CPU; its dispatch.

There is no GPU here: ``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels, so the kernels
run in one subprocess per precision that imports the module with it set, runs every case (forward and the value,
offset and mask gradients for one random cotangent, Triton vs ``dcnv3_core`` with the ``reference`` backend) and
prints the largest differences as JSON. On a GPU, ``bench/bench_erf.py gpu`` checks the compiled kernels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from erf_tools.extension_build import BuildState
from erf_tools.layers import dcnv3_fused, dcnv3_triton
from erf_tools.layers.dcnv3 import core_path
from erf_tools.layers.dcnv3_fused import core_backend
from erf_tools.layers.dcnv3_triton import TritonCoreUnavailable, triton_dcnv3_core, use_triton_core

pytestmark = pytest.mark.skipif(dcnv3_triton.triton is None, reason="triton is not installed")

# name: (n, h_in, w_in, group, group_channels, kernel_size, stride, pad, dilation, offset_scale, offset_std)
CASES = {
    "kernel 3, 2 groups": (2, 6, 7, 2, 4, 3, 1, 1, 1, 1.0, 1.5),
    "kernel 1": (1, 5, 4, 2, 3, 1, 1, 0, 1, 1.0, 1.0),
    "stride 2": (1, 7, 6, 2, 5, 3, 2, 1, 1, 1.0, 1.5),
    "dilation 2, scale 0.5": (1, 7, 6, 2, 4, 3, 1, 2, 2, 0.5, 1.5),
    "far outside": (1, 4, 5, 1, 3, 3, 1, 1, 1, 1.0, 4.0),
}

SCRIPT = r"""
import json, sys
import torch
import erf_tools.layers.dcnv3 as dcnv3
from erf_tools.layers.dcnv3_fused import core_backend
from erf_tools.layers.dcnv3_triton import triton_dcnv3_core

dtype = getattr(torch, sys.argv[1])
cases = json.loads(sys.argv[2])


def case_inputs(n, h_in, w_in, group, cg, k, stride, pad, dilation, scale, std):
    rng = torch.Generator().manual_seed(0)
    h = (h_in + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    w = (w_in + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    value = torch.randn(n, h_in, w_in, group * cg, generator=rng, dtype=dtype)
    offset = torch.randn(n, h, w, group * k * k * 2, generator=rng, dtype=dtype) * std
    offset.view(-1)[::7] = 1e6  # far outside: zero sample, zero gradient
    mask = torch.randn(n, h, w, group * k * k, generator=rng, dtype=dtype)
    return (value, offset, mask), dict(group=group, kernel_size=k, stride=stride, pad=pad, dilation=dilation,
                                       offset_scale=scale)


def run(fn, inputs, geometry):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **geometry)
    cotangent = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return [out.detach(), *torch.autograd.grad(out, leaves, cotangent)]


def reference(*args, **kwargs):
    with core_backend("reference"):
        return dcnv3.dcnv3_core(*args, **kwargs)


report = {}
for name, case in cases.items():
    inputs, geometry = case_inputs(*case)
    ours, ref = run(triton_dcnv3_core, inputs, geometry), run(reference, inputs, geometry)
    far = inputs[1].view(-1) == 1e6
    report[name] = {
        "shape": list(ours[0].shape) == list(ref[0].shape),
        "errors": [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(ours, ref)],
        "far_offset_grad": ours[2].reshape(-1)[far].abs().max().item(),
    }
# dcnv3_core hands its arguments to the Triton core in the right order when the dispatch picks it
dcnv3.use_triton_core = lambda *tensors: True
inputs, geometry = case_inputs(*cases["dilation 2, scale 0.5"])
via_core = run(dcnv3.dcnv3_core, inputs, geometry)
ref = run(reference, inputs, geometry)
report["via dcnv3_core"] = {"errors": [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(via_core, ref)]}
if dtype == torch.float64:  # central differences along one random direction of (value, offset, mask) together
    inputs, geometry = case_inputs(1, 3, 4, 2, 2, 3, 1, 1, 1, 1.0, 0.8)
    inputs = [t.clamp(-4.7, 4.7) for t in inputs]  # the 1e6 offsets at 4.7 px: off the integer kinks
    rng = torch.Generator().manual_seed(2)
    direction = [torch.randn(t.shape, generator=rng, dtype=dtype) for t in inputs]
    out, *grads = run(triton_dcnv3_core, inputs, geometry)
    cotangent = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))  # as in run()
    eps = 1e-6
    plus, minus = (triton_dcnv3_core(*[t + sign * eps * d for t, d in zip(inputs, direction)], **geometry)
                   for sign in (1, -1))
    numerical = ((plus - minus) / (2 * eps) * cotangent).sum().item()
    analytical = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    report["directional"] = [numerical, analytical]
print(json.dumps(report))
"""


def interpret(dtype: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT, dtype, json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def float32_report():
    return interpret("float32")


@pytest.fixture(scope="module")
def float64_report():
    return interpret("float64")


@pytest.mark.parametrize("case", [*CASES, "via dcnv3_core"])
def test_float32_matches_reference(float32_report, case):
    """Forward and the three gradients to float32 rounding (positions of ~10 px: ulp ~1e-6, relative to the max)."""
    report = float32_report[case]
    assert report.get("shape", True)
    for name, error in zip(("output", "d/dvalue", "d/doffset", "d/dmask"), report["errors"]):
        assert error < 1e-4, f"{case}: {name} off by {error:.1e} of its max"
    assert report.get("far_offset_grad", 0.0) == 0.0


@pytest.mark.parametrize("case", [*CASES, "via dcnv3_core"])
def test_float64_matches_reference(float64_report, case):
    report = float64_report[case]
    for name, error in zip(("output", "d/dvalue", "d/doffset", "d/dmask"), report["errors"]):
        assert error < 1e-11, f"{case}: {name} off by {error:.1e} of its max"
    assert report.get("far_offset_grad", 0.0) == 0.0


def test_directional_derivative_float64(float64_report):
    """Finite differences along one random direction of value, offset and mask together (gradcheck's fast mode,
    by hand: the interpreter makes each call ~0.5 s). The interpreter has float64 atomics, so the value gradient is
    accumulated in float64."""
    numerical, analytical = float64_report["directional"]
    assert abs(numerical - analytical) <= 1e-6 * max(1.0, abs(analytical)), (numerical, analytical)


def cuda_like(dtype=torch.float32):
    """What the dispatch reads of a CUDA tensor (there is no CUDA device here)."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, layout=torch.strided)


def test_dispatch_picks_triton_only_for_cuda(monkeypatch):
    monkeypatch.setattr(dcnv3_triton.KERNELS, "state", BuildState(loaded=True))
    monkeypatch.setattr(dcnv3_fused.EXTENSION, "state", BuildState(loaded=True))  # no C++ build for core_path
    monkeypatch.delenv(dcnv3_fused.ENV_VAR, raising=False)
    cpu = torch.zeros(1)
    assert use_triton_core(cuda_like(), cuda_like(), cuda_like())
    assert use_triton_core(*[cuda_like(torch.float64)] * 3)
    assert not use_triton_core(cpu, cpu, cpu)
    assert core_path(cpu, cpu, cpu) == "fused"
    assert not use_triton_core(cuda_like(), cuda_like(torch.float64), cuda_like())  # mixed dtypes: reference
    with core_backend("reference"):
        assert not use_triton_core(cuda_like())
    with core_backend("fused"):
        assert use_triton_core(cuda_like())
        with pytest.raises(ValueError, match="CUDA float32/float64"):
            use_triton_core(cuda_like(torch.float16))


def test_without_triton_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dcnv3_triton, "triton", None)
    monkeypatch.setattr(dcnv3_triton.KERNELS, "state", BuildState())
    monkeypatch.delenv(dcnv3_fused.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not use_triton_core(cuda_like())
        assert not use_triton_core(cuda_like())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "triton is not installed" in messages[0]
    with core_backend("fused"), pytest.raises(TritonCoreUnavailable, match="triton is not installed"):
        use_triton_core(cuda_like())
    with pytest.raises(TritonCoreUnavailable):
        triton_dcnv3_core(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 18), torch.zeros(1, 1, 1, 9), 1)
