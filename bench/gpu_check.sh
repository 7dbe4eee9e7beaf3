#!/usr/bin/env bash
# One short run on a CUDA machine (issue 18, item 5): GPU equals CPU on small cases, UniConvNet-T and RepLKNet-31B
# at 1024 px x 50 images (fp32, tf32, bf16: images/s, peak memory, Pearson to fp32), ResNet-50 @224 vs OpenERF when
# installed; the section goes into bench/RESULTS.md. Without CUDA it prints that it skipped and exits 0.
#
#   bench/gpu_check.sh                 # PYTHON=... to choose the interpreter; extra arguments go to bench_erf.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
# the CPU side of the equality checks uses every core of the GPU host (bench_erf.py defaults to 2 threads)
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" bench/bench_erf.py gpu --threads "${THREADS:-$(nproc)}" --write "$@"
