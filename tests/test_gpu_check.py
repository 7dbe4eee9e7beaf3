"""bench/gpu_check.sh must skip cleanly (exit 0, nothing written) on a machine without CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_skips_without_cuda():
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.is_file() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gpu: skipped: no CUDA device" in done.stdout
    assert (results.read_bytes() if results.is_file() else None) == before
