"""UniConvNet-T forward + input gradient on CPU, and where the time goes (RFA, DCN, DCN core, MLP).

Why: an ERF measurement is one forward and one input-gradient pass per image, and UniConvNet's DCNv3 has no CPU
kernel upstream; ours samples with ``F.grid_sample`` (erf_tools/models/dcnv3.py). This checks that the DCN core does
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
import platform
import time
from collections import defaultdict

import timm
import torch

import erf_tools.models.dcnv3 as dcnv3_module
from erf_tools.models.dcnv3 import DCNv3
from erf_tools.models.uniconvnet import ReceptiveFieldAggregator
from erf_tools.weights import activate_branches

BRANCHES = ("rfa", "dcn", "dcn_core", "mlp")


def objective(features: torch.Tensor) -> torch.Tensor:
    """RepLKNet protocol: sum over channels of ReLU(centre unit)."""
    _, _, height, width = features.shape
    return torch.relu(features[0, :, height // 2, width // 2]).sum()


def forward_backward(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, float]:
    """Seconds for the forward pass and for the input-gradient pass."""
    x = image.clone().requires_grad_(True)
    start = time.perf_counter()
    score = objective(model.forward_features(x))
    middle = time.perf_counter()
    (grad,) = torch.autograd.grad(score, x)
    end = time.perf_counter()
    assert grad.abs().sum() > 0
    return middle - start, end - middle


class BranchTimer:
    """Forward/backward seconds per branch kind, from module hooks and a wrapper around the DCN core."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.handles = []
        for module in model.modules():
            kind = "rfa" if isinstance(module, ReceptiveFieldAggregator) else "dcn" if isinstance(module, DCNv3) else None
            if kind is None and type(module).__name__ == "Mlp":
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
    forward, backward = min(runs, key=sum)
    return {
        "size": size,
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
        "instrumented_total": sum(instrumented),
        "instrumented": instrumented,
        "branches": {kind: tuple(timer.seconds[kind]) for kind in BRANCHES},
    }


def report(result: dict) -> list[str]:
    total = result["instrumented_total"]
    fwd_total, bwd_total = result["instrumented"]
    lines = [
        f"### {result['size']}x{result['size']}",
        "",
        f"forward {result['forward']:.2f} s + input gradient {result['backward']:.2f} s = "
        f"**{result['total']:.2f} s per image** (best of clean runs); instrumented run {total:.2f} s",
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

    lines = [
        f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"batch 1, float32, active init, parameters frozen",
        "",
    ]
    for size in args.sizes:
        repeats = args.repeats if size <= 512 else 1  # a 1024 pass takes tens of seconds on 2 cores
        result = bench_size(model, size, repeats)
        lines += report(result)
        if not args.markdown:
            print("\n".join(report(result)), flush=True)
    if args.markdown:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
