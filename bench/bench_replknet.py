"""Forward + input-gradient time of RepLKNet-31B on CPU: the cost of one RepLKNet-protocol ERF image.

Per image the ERF needs F = forward_features(x), S = Σ_c ReLU(F[0, c, h//2, w//2]) and ∂S/∂x; parameters are
frozen (no weight gradients), batch 1, eval mode, random init (timing does not depend on the weights). Modes:

* ``unmerged``: training-time layout, large + small kernel branches (what an official checkpoint loads as);
* ``merged``: after ``structural_reparam()`` (one K×K conv per block);
* ``merged+fft``: merged, large kernels through FFTs where that is faster (``fft_large_kernel="auto"``);
* ``unmerged+fft``: unmerged with the same FFT rule.

Each mode's input gradient is compared with the first mode's (the maps must agree to float rounding).
``--crossover`` times one depthwise conv, direct vs FFT, over kernel and map sizes (the rule behind "auto").

    .venv/bin/python bench/bench_replknet.py --sizes 224 1024 --repeats 3
    .venv/bin/python bench/bench_replknet.py --crossover

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, as the other benches here): on a shared machine spinning
threads of a descheduled sibling cost up to 10x in wall time. CPU seconds are reported next to wall seconds because
they are less sensitive to other jobs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

import erf_tools.models  # noqa: E402,F401  (registers replknet_31b)
from erf_tools.layers.fft_conv import fft_depthwise_conv2d  # noqa: E402

MODES = ("unmerged", "merged", "merged+fft", "unmerged+fft")


def build(mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("replknet_31b").eval().requires_grad_(False)
    if mode.startswith("merged"):
        model.structural_reparam()
    model.set_fft_large_kernel("auto" if mode.endswith("+fft") else False)
    return model


def input_gradient(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    features = model.forward_features(x)
    h, w = features.shape[-2:]
    features[0, :, h // 2, w // 2].relu().sum().backward()
    return x.grad


def bench_model(sizes: list[int], modes: list[str], repeats: int) -> None:
    print("| input | mode | wall s (min) | wall s (median) | CPU s (min) | repeats | "
          "max abs grad diff vs first mode (max abs grad) |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        reference = None
        for mode in modes:
            model = build(mode)
            grad = input_gradient(model, x)  # warm-up, also the map compared across modes
            times, cpu_times = [], []
            for _ in range(repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                input_gradient(model, x)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
            if reference is None:
                reference, diff = grad, "-"
            else:
                diff = f"{(grad - reference).abs().max().item():.2e} ({reference.abs().max().item():.2e})"
            print(f"| {size} | {mode} | {min(times):.2f} | {statistics.median(times):.2f} | {min(cpu_times):.2f} | "
                  f"{repeats} | {diff} |", flush=True)
            del model


def bench_crossover(channels: int, repeats: int) -> None:
    print(f"| kernel | map | direct ms | fft ms | direct/fft |  (one depthwise conv, {channels} channels, "
          "forward + input gradient, min of repeats)")
    print("|---|---|---|---|---|")
    for kernel in (13, 15, 21, 27, 29, 31):
        for size in (7, 14, 28, 56, 128, 256):
            x = torch.randn(1, channels, size, size, requires_grad=True)
            weight = torch.randn(channels, 1, kernel, kernel)
            result = {}
            for name, conv in (("direct", lambda: F.conv2d(x, weight, padding=kernel // 2, groups=channels)),
                               ("fft", lambda: fft_depthwise_conv2d(x, weight))):
                times = []
                for _ in range(repeats + 1):  # the first run is a warm-up
                    start = time.perf_counter()
                    out = conv()
                    out.backward(torch.ones_like(out))
                    times.append(time.perf_counter() - start)
                result[name] = min(times[1:]) * 1e3
            print(f"| {kernel} | {size} | {result['direct']:.2f} | {result['fft']:.2f} | "
                  f"{result['direct'] / result['fft']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--crossover", action="store_true", help="time single depthwise convs instead")
    parser.add_argument("--channels", type=int, default=64, help="channels of the --crossover convs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average before: {os.getloadavg()[0]:.1f}")
    if args.crossover:
        bench_crossover(args.channels, args.repeats)
    else:
        bench_model(args.sizes, args.modes, args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
