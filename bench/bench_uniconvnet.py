"""UniConvNet-T forward + input gradient on CPU, and where the time goes (RFA, DCN, DCN core, MLP).

Why: an ERF measurement is one forward and one input-gradient pass per image, and UniConvNet's DCNv3 has no CPU
kernel upstream; ours samples with ``F.grid_sample`` (erf_tools/layers/dcnv3.py). This checks that the DCN core does
not dominate a block, at the two input sizes the ERF protocols use (224 and RepLKNet's 1024).

Setup: ``uniconvnet_t`` with the all-branches-active init (``activate_branches``; at the official init the DCN mask
is 0), eval mode, batch 1, float32, parameters frozen (only the input gradient is needed), objective = the
RepLKNet-protocol scalar (sum over channels of ReLU of the centre unit of ``forward_features``).

The total is the minimum over ``--repeats`` clean runs (one run at sizes above 512; the 2-core machine is shared:
other processes only add time). Shares come from one instrumented run before them, which is also the warm-up:
forward pre/post hooks and full backward pre/post hooks on every ``attn`` / ``dcn`` / ``mlp`` module, and a timed
wrapper around ``dcnv3_core`` (backward = from the gradient reaching its output to the last gradient leaving its
inputs). The DCN branch includes its core; "rest" is stem, downsampling, the branch LayerNorms, layer scales,
residual adds and permutes. Shares are fractions of the instrumented run, so they survive a noisy machine better
than the absolute times do.

    .venv/bin/python bench/bench_uniconvnet.py [--sizes 224 1024] [--repeats 3] [--threads 2] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

# On a shared machine, OpenMP threads that spin-wait for a descheduled sibling cost up to 10x in wall time (measured
# here at load average 8 on 2 cores); passive waiting keeps the figures about the model. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import timm  # noqa: E402
import torch  # noqa: E402

import erf_tools.layers.dcnv3 as dcnv3_module  # noqa: E402
from erf_tools.layers.dcnv3 import DCNv3  # noqa: E402
from erf_tools.models.uniconvnet import ReceptiveFieldAggregator  # noqa: E402
from erf_tools.weights import activate_branches  # noqa: E402

BRANCHES = ("rfa", "dcn", "dcn_core", "mlp")


def objective(features: torch.Tensor) -> torch.Tensor:
    """RepLKNet protocol: sum over channels of ReLU(centre unit)."""
    _, _, height, width = features.shape
    return torch.relu(features[0, :, height // 2, width // 2]).sum()


def forward_backward(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, float, float]:
    """Wall seconds for the forward pass and for the input-gradient pass, and the process CPU seconds of both.

    CPU seconds (all threads) are less sensitive to other processes on a shared machine than wall time.
    """
    x = image.clone().requires_grad_(True)
    cpu = time.process_time()
    start = time.perf_counter()
    score = objective(model.forward_features(x))
    middle = time.perf_counter()
    (grad,) = torch.autograd.grad(score, x)
    end = time.perf_counter()
    cpu = time.process_time() - cpu
    assert grad.abs().sum() > 0
    return middle - start, end - middle, cpu


class BranchTimer:
    """Forward/backward seconds per branch kind, from module hooks and a wrapper around the DCN core."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.handles = []
        for module in model.modules():
            kind = None
            if isinstance(module, ReceptiveFieldAggregator):
                kind = "rfa"
            elif isinstance(module, DCNv3):
                kind = "dcn"
            elif type(module).__name__ == "Mlp":
                kind = "mlp"
            if kind is not None:
                self._hook(module, kind)
        self._original_core = dcnv3_module.dcnv3_core
        dcnv3_module.dcnv3_core = self._timed_core

    def _hook(self, module: torch.nn.Module, kind: str) -> None:
        starts = {}

        def forward_pre(*_):
            starts["forward"] = time.perf_counter()

        def forward_post(*_):
            self.seconds[kind][0] += time.perf_counter() - starts["forward"]

        def backward_pre(*_):
            starts["backward"] = time.perf_counter()

        def backward_post(*_):
            self.seconds[kind][1] += time.perf_counter() - starts["backward"]

        self.handles += [
            module.register_forward_pre_hook(forward_pre),
            module.register_forward_hook(forward_post),
            module.register_full_backward_pre_hook(backward_pre),
            module.register_full_backward_hook(backward_post),
        ]

    def _timed_core(self, value, offset, mask, *args, **kwargs):
        start = time.perf_counter()
        out = self._original_core(value, offset, mask, *args, **kwargs)
        self.seconds["dcn_core"][0] += time.perf_counter() - start
        if out.requires_grad:
            span = {}
            out.register_hook(lambda grad: span.__setitem__("start", time.perf_counter()))
            pending = [t for t in (value, offset, mask) if t.requires_grad]

            def leaving(grad, span=span, pending=pending):
                pending.pop()
                if not pending:  # the last input gradient of this core call
                    self.seconds["dcn_core"][1] += time.perf_counter() - span["start"]

            for tensor in pending:
                tensor.register_hook(leaving)
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        dcnv3_module.dcnv3_core = self._original_core


def bench_size(model: torch.nn.Module, size: int, repeats: int) -> dict:
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    timer = BranchTimer(model)
    try:
        instrumented = forward_backward(model, image)  # also the warm-up of the clean runs
    finally:
        timer.remove()
    runs = [forward_backward(model, image) for _ in range(repeats)]
    forward, backward, cpu = min(runs, key=lambda run: run[0] + run[1])
    return {
        "size": size,
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
        "cpu": cpu,
        "instrumented_total": instrumented[0] + instrumented[1],
        "instrumented": instrumented[:2],
        "branches": {kind: tuple(timer.seconds[kind]) for kind in BRANCHES},
    }


def report(result: dict) -> list[str]:
    total = result["instrumented_total"]
    fwd_total, bwd_total = result["instrumented"]
    lines = [
        f"### {result['size']}x{result['size']}",
        "",
        f"forward {result['forward']:.2f} s + input gradient {result['backward']:.2f} s = "
        f"**{result['total']:.2f} s per image** wall ({result['cpu']:.1f} CPU s, best clean run); "
        f"instrumented run {total:.2f} s wall",
        "",
        "| part | forward s | backward s | share of forward+backward |",
        "|---|---|---|---|",
    ]
    rest_fwd, rest_bwd = fwd_total, bwd_total
    for kind in BRANCHES:
        fwd, bwd = result["branches"][kind]
        if kind != "dcn_core":
            rest_fwd, rest_bwd = rest_fwd - fwd, rest_bwd - bwd
        label = {"rfa": "RFA branch (attn)", "dcn": "DCN branch (incl. core)", "dcn_core": "  DCN core (grid_sample)",
                 "mlp": "MLP branch"}[kind]
        lines.append(f"| {label} | {fwd:.3f} | {bwd:.3f} | {100 * (fwd + bwd) / total:.1f} % |")
    lines.append(f"| rest (stem, downsampling, norms, residuals) | {rest_fwd:.3f} | {rest_bwd:.3f} | "
                 f"{100 * (rest_fwd + rest_bwd) / total:.1f} % |")
    dcn = sum(result["branches"]["dcn"])
    core = sum(result["branches"]["dcn_core"])
    lines += ["", f"DCN core = {100 * core / dcn:.0f} % of the DCN branch, {100 * core / total:.1f} % of the pass.", ""]
    return lines


def _cpu_seconds(fn, repeats: int) -> float:
    """Process CPU seconds (all threads) of ``fn``, the minimum over ``repeats`` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def block_shares(model: torch.nn.Module, size: int, repeats: int) -> list[str]:
    """CPU seconds of forward + input gradient for the first block of each stage, its branches and its DCN core.

    Each part runs alone on a random input of the shape it sees in the model, so the figures do not depend on hooks;
    the branch rows include their LayerNorm, the core row is ``dcnv3_core`` alone.
    """
    lines = [
        f"Per block at {size}x{size} (first block of each stage, forward + input gradient, CPU seconds, best of "
        f"{repeats}):",
        "",
        "| stage | map | block | RFA branch | DCN branch | DCN core | MLP branch | core / block |",
        "|---|---|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for index, stage in enumerate(model.stages):
        block = stage[0]
        side = size // 2 ** (index + 2)
        dim = block.gamma1.numel()
        x = torch.randn(1, dim, side, side, generator=generator)
        x_last = x.permute(0, 2, 3, 1).contiguous()
        group, points = block.dcn.group, block.dcn.kernel_size**2
        core_inputs = (
            torch.randn(1, side, side, dim, generator=generator),
            torch.randn(1, side, side, group * points * 2, generator=generator),
            torch.randn(1, side, side, group * points, generator=generator) * 0.3,
        )

        def grad_of(fn, *inputs):
            def run():
                leaves = [t.clone().requires_grad_(True) for t in inputs]
                out = fn(*leaves)
                torch.autograd.grad(out, leaves, torch.ones_like(out))

            return run

        times = {
            "block": _cpu_seconds(grad_of(block, x), repeats),
            "rfa": _cpu_seconds(grad_of(block.attn, x), repeats),
            "dcn": _cpu_seconds(grad_of(lambda t: block.dcn(block.norm1(t)), x_last), repeats),
            "core": _cpu_seconds(
                grad_of(lambda v, o, m: dcnv3_module.dcnv3_core(v, o, m, group), *core_inputs), repeats
            ),
            "mlp": _cpu_seconds(grad_of(lambda t: block.mlp(block.norm2(t)), x_last), repeats),
        }
        lines.append(
            f"| {index} | {dim}x{side}x{side} | {times['block']:.3f} | {times['rfa']:.3f} | {times['dcn']:.3f} | "
            f"{times['core']:.3f} | {times['mlp']:.3f} | {100 * times['core'] / times['block']:.0f} % |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="print only the markdown block for RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = timm.create_model("uniconvnet_t")
    activate_branches(model, seed=0)
    model.eval().requires_grad_(False)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, "
        f"batch 1, float32, active init, parameters frozen; "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average {load:.1f} at start",
        "",
    ]
    for size in args.sizes:
        repeats = args.repeats if size <= 512 else 1  # a 1024 pass takes tens of seconds on 2 cores
        result = bench_size(model, size, repeats)
        section = report(result) + block_shares(model, size, args.repeats)
        lines += section
        if not args.markdown:
            print("\n".join(section), flush=True)
    if args.markdown:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
