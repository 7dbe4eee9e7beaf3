"""Spatial vs Fast-ParC (FFT) crossover of the ParC operator on CPU.

Why: ParC's kernel is as long as the feature map, so the official wrap-and-convolve form costs O(L²) per output
column and the FFT form O(L log L). Which one is faster for the sizes the ERF protocols produce (7 and 14 at 224,
32 and 64 at 1024) is a property of the machine's conv and FFT kernels, not of the asymptotics, so it is measured
here and the ``'auto'`` path of :class:`erf_tools.models.parc.ParC` follows the result (``FFT_MIN_LENGTH``).

Both the forward pass and forward + input gradient (what an ERF measurement runs) are timed for a ParC pair (one
``'H'`` and one ``'W'`` operator, as every ParC block has), batch 1, float32, at the channel counts of the
registered models: depthwise halves of ParC-ConvNeXt-XT (96, 192) and -T (192, 384), dense
halves of ParC-ResNet50 (128, 256).

    .venv/bin/python bench/bench_parc.py [--sizes 7 14 32 64] [--threads 2] [--repeats 40] [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from erf_tools.layers.parc import FFT_MIN_LENGTH, ParC

DEPTHWISE_CHANNELS = (96, 192, 384)
DENSE_CHANNELS = (128, 256)
SIZES = (7, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)


#: The clock: ``time.perf_counter`` (wall) or ``time.thread_time`` (CPU time of this thread; see ``--clock``).
CLOCK = time.perf_counter


def _calls_per_block(fn, block: float) -> int:
    fn()  # warm-up (allocations, FFT plans)
    calls = 1
    while True:
        start = CLOCK()
        for _ in range(calls):
            fn()
        if CLOCK() - start >= block or calls >= 1024:
            return calls
        calls *= 2


def _time_pair(fns: dict, repeats: int, block: float = 0.002) -> dict[str, float]:
    """Seconds per call of each function: the minimum over ``repeats`` blocks of at least ``block`` seconds.

    The candidates are timed alternately, block by block, so that both see the same background load, and the
    minimum (not the median) is kept because the 2-core machine is shared: other processes only ever add time.
    """
    calls = {name: _calls_per_block(fn, block) for name, fn in fns.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = CLOCK()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (CLOCK() - start) / calls[name])
    return best


def bench_one(channels: int, length: int, dense: bool, repeats: int) -> dict[str, float]:
    """Forward and forward+input-grad times (ms) of both paths for a ParC pair (as in the models: one ``'H'`` op and
    one ``'W'`` op, each on its own 1 x C x L x L half)."""
    groups = 1 if dense else channels
    ops = [ParC(channels, d, length, groups=groups).eval().requires_grad_(False) for d in ("H", "W")]
    xs = [torch.randn(1, channels, length, length) for _ in ops]
    xs_grad = [x.clone().requires_grad_(True) for x in xs]

    def forward(path: str):
        def run() -> None:
            with torch.no_grad():
                for op, x in zip(ops, xs):
                    op.path = path
                    op(x)

        return run

    def forward_grad(path: str):
        def run() -> None:
            total = 0
            for op, x in zip(ops, xs_grad):
                op.path = path
                total = total + op(x).sum()
            torch.autograd.grad(total, xs_grad)

        return run

    fwd = _time_pair({p: forward(p) for p in ("spatial", "fft")}, repeats)
    fwd_grad = _time_pair({p: forward_grad(p) for p in ("spatial", "fft")}, repeats)
    return {
        "spatial_fwd": fwd["spatial"] * 1e3,
        "fft_fwd": fwd["fft"] * 1e3,
        "spatial_fwdbwd": fwd_grad["spatial"] * 1e3,
        "fft_fwdbwd": fwd_grad["fft"] * 1e3,
    }


def crossover(rows: list[tuple[int, int, dict[str, float]]], key: str = "fwdbwd") -> int | None:
    """Smallest measured L from which the FFT path is faster at every larger measured L and every channel count."""
    lengths = sorted({length for _, length, _ in rows})
    fft_wins = {
        length: all(r[f"fft_{key}"] < r[f"spatial_{key}"] for _, l2, r in rows if l2 == length) for length in lengths
    }
    answer = None
    for length in reversed(lengths):
        if not fft_wins[length]:
            break
        answer = length
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--kinds", nargs="+", choices=("depthwise", "dense"), default=["depthwise", "dense"])
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter at --threads; cpu: CPU time of the calling thread at 1 thread, which other "
        "processes on a shared machine cannot inflate (all intra-op and CPU autograd work runs on that thread)",
    )
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK, args.threads = time.thread_time, 1
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
        f"{args.clock} clock, min of {args.repeats} blocks"
    )
    print(f"FFT_MIN_LENGTH in the code now: {FFT_MIN_LENGTH}\n")
    header = (
        "| kind | C | L | spatial fwd ms | FFT fwd ms | spatial fwd+grad ms | FFT fwd+grad ms | faster (fwd+grad) |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    suggested = {}
    for kind, channel_list in (("depthwise", DEPTHWISE_CHANNELS), ("dense", DENSE_CHANNELS)):
        if kind not in args.kinds:
            continue
        rows = []
        for channels in channel_list:
            for length in args.sizes:
                r = bench_one(channels, length, kind == "dense", args.repeats)
                rows.append((channels, length, r))
                faster = "FFT" if r["fft_fwdbwd"] < r["spatial_fwdbwd"] else "spatial"
                print(
                    f"| {kind} | {channels} | {length} | {r['spatial_fwd']:.3f} | {r['fft_fwd']:.3f} | "
                    f"{r['spatial_fwdbwd']:.3f} | {r['fft_fwdbwd']:.3f} | {faster} |",
                    flush=True,
                )
        suggested[kind] = {"fwd+grad": crossover(rows, "fwdbwd"), "fwd": crossover(rows, "fwd")}
    print("\nFFT faster from L = (every measured channel count and every larger measured L):")
    for kind, values in suggested.items():
        print(f"  {kind}: forward+input-grad {values['fwd+grad']}, forward {values['fwd']}")


if __name__ == "__main__":
    main()
