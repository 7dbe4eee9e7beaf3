"""Spatial vs Fast-ParC (FFT) crossover of the ParC operator on CPU.

Why: ParC's kernel is as long as the feature map, so the official wrap-and-convolve form costs O(L²) per output
column and the FFT form O(L log L). Which one is faster for the sizes the ERF protocols produce (7 and 14 at 224,
32 and 64 at 1024) is a property of the machine's conv and FFT kernels, not of the asymptotics, so it is measured
here and the ``'auto'`` path of :class:`erf_tools.models.parc.ParC` follows the result (``FFT_MIN_LENGTH``).

Both the forward pass and forward + input gradient (what an ERF measurement runs) are timed, batch 1, float32, at
the channel counts of the registered models: depthwise halves of ParC-ConvNeXt-XT (96, 192) and -T (192, 384), dense
halves of ParC-ResNet50 (128, 256).

    .venv/bin/python bench/bench_parc.py [--sizes 7 14 32 64] [--threads 2] [--markdown]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from erf_tools.models.parc import FFT_MIN_LENGTH, ParC

DEPTHWISE_CHANNELS = (96, 192, 384)
DENSE_CHANNELS = (128, 256)
SIZES = (7, 10, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)


def _time(fn, repeats: int = 15, block: float = 0.01) -> float:
    """Seconds per call: the minimum over ``repeats`` blocks of at least ``block`` seconds each.

    The minimum, not the median, because the 2-core machine is shared: other processes only ever add time.
    """
    fn()  # warm-up (allocations, FFT plans)
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start >= block or calls >= 1024:
            break
        calls *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return min(samples)


def bench_one(channels: int, length: int, dense: bool, direction: str = "H") -> dict[str, float]:
    """Forward and forward+input-grad times (ms) of both paths for one operator at an L x L feature map."""
    op = ParC(channels, direction, length, groups=1 if dense else channels).eval()
    op.requires_grad_(False)
    x = torch.randn(1, channels, length, length)
    x_grad = x.clone().requires_grad_(True)
    result = {}
    for path in ("spatial", "fft"):
        op.path = path

        def forward() -> None:
            with torch.no_grad():
                op(x)

        def forward_backward() -> None:
            (grad,) = torch.autograd.grad(op(x_grad).sum(), x_grad)

        result[f"{path}_fwd"] = _time(forward) * 1e3
        result[f"{path}_fwdbwd"] = _time(forward_backward) * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    print(f"# current FFT_MIN_LENGTH = {FFT_MIN_LENGTH}")
    header = "| kind | C | L | spatial fwd ms | FFT fwd ms | spatial fwd+grad ms | FFT fwd+grad ms | faster (fwd+grad) |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for dense, channel_list in ((False, DEPTHWISE_CHANNELS), (True, DENSE_CHANNELS)):
        for channels in channel_list:
            for length in args.sizes:
                r = bench_one(channels, length, dense)
                faster = "FFT" if r["fft_fwdbwd"] < r["spatial_fwdbwd"] else "spatial"
                kind = "dense" if dense else "depthwise"
                print(
                    f"| {kind} | {channels} | {length} | {r['spatial_fwd']:.3f} | {r['fft_fwd']:.3f} | "
                    f"{r['spatial_fwdbwd']:.3f} | {r['fft_fwdbwd']:.3f} | {faster} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
