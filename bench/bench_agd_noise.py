"""Bias and interval coverage of the noise-free AGD score on simulated maps with a known truth (issue 13, item 4).

For every shape × noise model × N (bench/agd_noise_cases.py) it draws ``--reps`` sets of N per-image maps, analyses
their stack with ``analyze(stack, bootstrap=--boot)`` and compares ``agd_score`` (and ``agd_score_raw``) with the
score of the exact noise-free mean map. Columns: mean bias of the raw score, of the plug-in estimate (before the
residual bootstrap's bias correction, which needs the bootstrap) and of ``agd_score`` (with its standard error), mean
95 % interval half-width, |bias| / half-width (target < 0.25) and coverage of the true score (target ≥ 0.9).

    OMP_NUM_THREADS=1 python bench/bench_agd_noise.py --size 48 --reps 20 --boot 60 --sigma 0.3 --n 8 16 64 256
    python bench/bench_agd_noise.py ... --markdown      # the table for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
from agd_noise_cases import NOISES, SHAPES, draw, shape, true_score  # noqa: E402

from erf_tools.analysis import analyze  # noqa: E402


def run_case(name: str, noise: str, sigma: float, n: int, size: int, reps: int, boot: int, seed: int) -> dict:
    """Bias, coverage and half-width from ``reps`` bootstrapped analyses; the bias of the plug-in estimate (the score
    before the residual bootstrap's correction, ``report.noise_free.score``) from the same draws."""
    t = shape(name, size)
    truth = true_score(t, noise, sigma)
    rng = np.random.default_rng(seed)
    est, plug_in, raw, cover, half = [], [], [], [], []
    for r in range(reps):
        report = analyze(draw(t, noise, sigma, n, rng), bootstrap=boot, seed=r)
        est.append(report.agd_score)
        plug_in.append(report.noise_free.score if report.noise_free is not None else np.nan)
        raw.append(report.agd_score_raw)
        low, high = report.interval("agd_score")
        cover.append(bool(low <= truth <= high))
        half.append((high - low) / 2)
    bias = float(np.nanmean(est) - truth)
    hw = float(np.nanmean(half))
    return {"shape": name, "noise": noise, "n": n, "truth": truth, "raw_bias": float(np.nanmean(raw) - truth),
            "plug_in_bias": float(np.nanmean(plug_in) - truth),
            "bias": bias, "bias_se": float(np.nanstd(est, ddof=1) / np.sqrt(np.isfinite(est).sum())),
            "half_width": hw, "ratio": abs(bias) / hw if hw > 0 else float("inf"),
            "coverage": float(np.mean(cover))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--boot", type=int, default=60)
    parser.add_argument("--sigma", type=float, default=0.3, help="per-image noise s.d. (shape peak = 1)")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 16, 64, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--noises", nargs="+", default=list(NOISES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    print("| shape | noise | N | true score | raw bias | plug-in bias | bias ± s.e. | half-width | bias/hw | coverage |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    start = time.time()
    for name in args.shapes:
        for noise in args.noises:
            for n in args.n:
                row = run_case(name, noise, args.sigma, n, args.size, args.reps, args.boot, args.seed)
                ok = "" if (row["ratio"] < 0.25 and row["coverage"] >= 0.9) else " ✗"
                print(f"| {name} | {noise} | {n} | {row['truth']:.3f} | {row['raw_bias']:+.3f} | {row['plug_in_bias']:+.4f} | "
                      f"{row['bias']:+.4f} ± {row['bias_se']:.4f} "
                      f"| {row['half_width']:.4f} | {row['ratio']:.2f} | {row['coverage']:.2f}{ok} |", flush=True)
    print(f"\n{time.time() - start:.0f} s; size {args.size}, σ {args.sigma}, {args.reps} repetitions with "
          f"{args.boot} resamples")


if __name__ == "__main__":
    main()
