"""Time of ``erf_tools.analysis.analyze()`` on 1024×1024 ERF maps (CPU), with and without the bootstrap.

The map is synthetic but ERF-like: a rotated Gaussian (σ 120 × 80 px) on a 2 % floor with a faint stride-2
checkerboard, seen through 50 noisy "images" (per-pixel gamma noise, shape 4). As the engine does by default
(``per_image_resolution=256``), the per-image maps are kept block-summed by 4 (50 × 256 × 256). Timed: the pieces
(full-covariance fit, Kim-compatible fit), ``analyze`` without per-image maps, and ``analyze`` with the bootstrap
(``--resamples``, default 200) and the convergence curve. The subsampled fit is also compared with the same fit on
every pixel (accuracy check of the block-mean fit).

    .venv/bin/python bench/bench_analysis.py --repeats 3
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from erf_tools.analysis import analyze, block_reduce, fit_gaussian, fit_gaussian_kim, gaussian_2d


def synthetic(size: int, images: int, downsample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = gaussian_2d((size, size), (size / 2 - 12, size / 2 + 8), 0.117 * size, 0.078 * size, np.radians(25),
                       offset=0.02)
    base = base * (1 + 0.05 * (np.indices((size, size)).sum(axis=0) % 2))
    total = np.zeros((size, size))
    per_image = []
    for _ in range(images):
        m = (base * rng.gamma(4.0, 0.25, size=base.shape)).astype(np.float32)
        total += m
        per_image.append(block_reduce(m, downsample, how="sum").astype(np.float32))
    return total / images, np.stack(per_image)


def timed(fn, repeats: int):
    """(median wall s, min wall s, min CPU s of this process, last output)."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), min(times), min(cpu), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--downsample", type=int, default=4)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    erf, per_image = synthetic(args.size, args.images, args.downsample)
    print(f"# analyze() on {args.size}x{args.size} maps: {args.images} images, per-image maps "
          f"{per_image.shape[1]}x{per_image.shape[2]} (block {args.downsample}), {args.resamples} resamples")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows = []
    t, best, cpu, fit = timed(lambda: fit_gaussian(erf), args.repeats)
    rows.append(("fit_gaussian (full covariance, block means + refine)", t, best, cpu))
    t, best, cpu, _ = timed(lambda: fit_gaussian_kim(erf), args.repeats)
    rows.append(("fit_gaussian_kim (every pixel, reduced 6-row problem)", t, best, cpu))
    t, best, cpu, report = timed(lambda: analyze(erf, bootstrap=0), args.repeats)
    rows.append(("analyze(map) - no per-image maps, no bootstrap", t, best, cpu))
    t, best, cpu, boot = timed(lambda: analyze(erf, per_image_maps=per_image, per_image_downsample=args.downsample,
                                          bootstrap=args.resamples), args.repeats)
    rows.append((f"analyze(map + per-image maps, bootstrap={args.resamples}) incl. convergence curve", t, best, cpu))
    t, best, cpu, full = timed(lambda: fit_gaussian(erf, max_fit_side=args.size, refine_side=args.size, restarts=False), 1)
    rows.append(("fit_gaussian on every pixel (accuracy reference, 1 run)", t, best, cpu))

    print("\n| step | median wall s | min wall s | min CPU s |\n|---|---|---|---|")
    for name, median, low, cpu in rows:
        print(f"| {name} | {median:.2f} | {low:.2f} | {cpu:.2f} |")
    print(f"\nblock-mean fit (block {fit.block}) vs every-pixel fit: σ_major {fit.sigma_major:.3f} vs "
          f"{full.sigma_major:.3f} ({100 * (fit.sigma_major / full.sigma_major - 1):+.3f} %), σ_minor "
          f"{fit.sigma_minor:.3f} vs {full.sigma_minor:.3f} ({100 * (fit.sigma_minor / full.sigma_minor - 1):+.3f} %),"
          f" θ {np.degrees(fit.theta):.2f}° vs {np.degrees(full.theta):.2f}°, R² {fit.r_squared:.5f} vs "
          f"{full.r_squared:.5f}")
    print(f"AGD {report.agd_score:.4f}; bootstrap 95 % CI of AGD {boot.interval('agd_score')}, σ_major "
          f"{boot.interval('sigma_major')}; convergence: {boot.convergence.converged_at} images to "
          f"Hellinger ≤ {boot.convergence.tolerance}")


if __name__ == "__main__":
    main()
