"""Benchmarks of the extraction engine (issue 8): one subcommand per question, results as a markdown section.

    bench/.venv-openerf/bin/python bench/bench_erf.py openerf        # 1. vs OpenERF, resnet50 @224, Kim protocol
    bench/.venv-openerf/bin/python bench/bench_erf.py replknet-loop  # 2. vs the published RepLKNet loop @1024
    bench/.venv-openerf/bin/python bench/bench_erf.py overhead       # 3. engine vs a bare forward + input-gradient
    bench/.venv-openerf/bin/python bench/bench_erf.py targets        # 4. four stage targets vs one
    bench/.venv-openerf/bin/python bench/bench_erf.py backward-split # 4. its floor: forward and per-target backwards
    bench/.venv-openerf/bin/python bench/bench_erf.py memory         # 5. peak memory per image, auto batch size
    bench/.venv-openerf/bin/python bench/bench_erf.py profile        # where the time goes (torch.profiler)
    bench/.venv-openerf/bin/python bench/bench_erf.py dcnv3-core     # issue 18: fused vs grid_sample DCNv3 core
    bench/gpu_check.sh                                               # issue 18: one short run on a CUDA machine

All of them run in the benchmark environment (``bench/.venv-openerf``: the project plus ``openerf==0.6.1``, never a
dependency of erf-tools); only ``openerf`` needs it. ``--write`` puts the section into ``bench/RESULTS.md``
(replacing this script's earlier section of the same name, leaving everything else alone).

Method, because the machine is shared (other jobs keep the load average at 5-11 on 2 cores): every compared
configuration runs once per *round*, in a rotated order, and ratios are taken within a round, so that the load
drift between rounds cancels; the table gives the median over rounds of wall-clock throughput and of the ratio,
and the same for process CPU seconds (all threads), which depend less on the other jobs. OpenMP threads wait
passively (``OMP_WAIT_POLICY=PASSIVE``): spinning threads of a descheduled sibling cost up to 10x in wall time
here. Thread count: ``--threads`` (default 2, the machine's cores).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"

import timm  # noqa: E402

import erf_tools  # noqa: E402,F401  (registers the model families)
from erf_tools import measure_erf  # noqa: E402
from erf_tools.engine.engine import frozen_eval  # noqa: E402
from erf_tools.engine.fastpaths import prepare_model  # noqa: E402
from erf_tools.targets import resolve_targets  # noqa: E402
from erf_tools.weights import activate_branches  # noqa: E402

warnings.filterwarnings("ignore", message=".*silenced.*")


# --- shared helpers ------------------------------------------------------------------------------------------------


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, timm {timm.__version__}, "
            f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
            f"bf16 CPU kernels: {'yes' if torch.backends.mkldnn.is_available() else 'no'}, "
            f"load average {load:.1f} at start")


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds of all threads, return value) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def rounds(configs: dict[str, Callable[[], object]], count: int, log=print) -> dict[str, dict]:
    """Run every config once per round, in an order rotated each round; keep all times and the last value."""
    names = list(configs)
    times = {name: {"wall": [], "cpu": [], "steady": [], "value": None} for name in names}
    for index in range(count):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            wall, cpu, value = timed(configs[name])
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
            times[name]["steady"].append(steady_seconds_per_image(value))
            times[name]["value"] = value
            log(f"  round {index + 1}/{count} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU (load {os.getloadavg()[0]:.1f})")
    return times


def ratio_rows(times: dict[str, dict], baseline: str, images: int) -> list[tuple[str, float, float, float, float]]:
    """(name, images/s wall, wall ratio vs baseline, images/s CPU, CPU ratio), medians over rounds; ratios are
    taken within each round."""
    rows = []
    for name, t in times.items():
        wall_ratio = statistics.median(b / w for b, w in zip(times[baseline]["wall"], t["wall"]))
        cpu_ratio = statistics.median(b / c for b, c in zip(times[baseline]["cpu"], t["cpu"]))
        rows.append((name, images / statistics.median(t["wall"]), wall_ratio, images / statistics.median(t["cpu"]),
                     cpu_ratio))
    return rows


def ratio_table(rows, baseline: str) -> str:
    lines = [f"| configuration | images/s (wall) | × {baseline} (wall) | images/CPU-s | × {baseline} (CPU) |",
             "|---|---|---|---|---|"]
    for name, ips, ratio, ipc, cratio in rows:
        lines.append(f"| {name} | {ips:.3f} | **{ratio:.2f}×** | {ipc:.3f} | {cratio:.2f}× |")
    return "\n".join(lines)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def write_section(name: str, text: str) -> None:
    """Replace this script's section ``name`` in RESULTS.md (re-read just before writing), or append it."""
    begin, end = f"<!-- bench_erf:{name} -->", f"<!-- /bench_erf:{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    updated = pattern.sub(lambda _m: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    RESULTS.write_text(updated)


def command_line() -> str:
    return "bench/.venv-openerf/bin/python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def sample_folder(count: int, name: str) -> Path:
    """``count`` images written once as PNG files (the bundled sample photographs and seeded crops of them), so
    that both tools read the very same files."""
    from erf_tools.images import open_image_source

    folder = OUT / name
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(files) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    source = open_image_source("sample", num_images=count, seed=0)
    for index in range(count):
        source.load(index).convert("RGB").save(folder / f"img_{index:03d}.png")
    return folder


def active_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The architecture with every branch live (no pretrained weights can be downloaded here)."""
    torch.manual_seed(seed)
    return activate_branches(timm.create_model(name, pretrained=False), seed=seed).eval()


# --- 1. OpenERF ----------------------------------------------------------------------------------------------------


def cmd_openerf(args) -> str:
    import openerf
    from erf_tools.analysis import analyze

    folder = sample_folder(args.images, f"images{args.images}")
    model = active_model("resnet50")

    def ours(batch_size, **kwargs):
        return lambda: measure_erf(model, folder, protocol="kim2023", targets="layer4", batch_size=batch_size,
                                   **kwargs)

    fp32_label = "erf-tools defaults (fp32, batch 'auto', exact fast paths)"
    bf16_label = f"erf-tools bf16, batch {args.bf16_batch_size}, fast paths"
    plain_label = f"erf-tools fp32, batch {args.batch_size}, fast=False (the former default)"
    configs = {
        "OpenERF 0.6.1 (batch 1)": lambda: openerf.compute_erf(
            model, model_name="resnet50", image_dir=folder, max_images=args.images, target_layer="layer4",
            device="cpu", show_progress=False),
        fp32_label: ours("auto"),
        **{f"erf-tools defaults, batch {size}": ours(size) for size in sorted({1, 8, 16, args.batch_size})},
        plain_label: ours(args.batch_size, fast=False),
        bf16_label: ours(args.bf16_batch_size, precision="bf16"),
    }
    print(f"openerf: resnet50 @224, {args.images} images, {args.rounds} rounds")
    times = rounds(configs, args.rounds)
    baseline = "OpenERF 0.6.1 (batch 1)"
    rows = ratio_rows(times, baseline, args.images)
    reference = times[baseline]["value"].erf_map
    fp32, bf16, plain = (times[label]["value"] for label in (fp32_label, bf16_label, plain_label))
    report_fp32, report_bf16 = analyze(fp32, bootstrap=None), analyze(bf16, bootstrap=None)
    checks = [
        ("max \\|erf-tools fp32 − OpenERF\\| / max (same protocol)", np.abs(plain.map - reference).max() / reference.max()),
        ("same, defaults (fast paths, batch 'auto')", np.abs(fp32.map - reference).max() / reference.max()),
        ("batch size chosen by 'auto' (last round)", fp32.timing["engine"]["batch_size"]),
        ("Pearson(bf16 map, fp32 map)", pearson(bf16.map, fp32.map)),
        ("AGD score fp32", report_fp32.agd_score),
        ("AGD score bf16", report_bf16.agd_score),
        ("\\|AGD bf16 − AGD fp32\\|", abs(report_bf16.agd_score - report_fp32.agd_score)),
    ]
    text = [
        "## erf-tools vs OpenERF: resnet50 @224, Kim et al. protocol (issue 8, benchmark 1"
        + ("; issue 18: the defaults)" if args.tag else ")"),
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}",
        "",
        f"The same {args.images} PNG files (`bench/out/images{args.images}`, bundled sample photographs and seeded "
        "crops), the same timm `resnet50` module (active init: every branch live; no pretrained weights offline), "
        "`layer4` target, each tool's own image decoding and timm preprocessing included in the time. OpenERF runs "
        "its fixed batch of 1. Medians of "
        f"{args.rounds} rounds; ratios within rounds.",
        "",
        ratio_table(rows, "OpenERF"),
        "",
        "| check | value |",
        "|---|---|",
        *[f"| {name} | {value:.6g} |" for name, value in checks],
    ]
    return "\n".join(text)


# --- 2. the published RepLKNet loop --------------------------------------------------------------------------------


def published_loop(model: torch.nn.Module, folder: Path, count: int, features) -> np.ndarray:
    """``erf/visualize_erf.py`` of RepLKNet-pytorch, re-implemented from the protocol: batch 1, fp32, trainable
    parameters (as published: an optimiser exists only for ``zero_grad``), one forward and one ``autograd.grad``
    per image, ReLU of the centre activations summed over channels, ReLU of the input gradient summed over RGB,
    AverageMeter mean; 1024 bicubic warp, ImageNet mean/std."""
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize((1024, 1024), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    model.eval()
    total, seen = None, 0
    for path in sorted(folder.glob("*.png"))[:count]:
        with Image.open(path) as image:
            samples = transform(image.convert("RGB")).unsqueeze(0)
        samples.requires_grad = True
        outputs = features(model, samples)
        out_size = outputs.size()
        central_point = torch.nn.functional.relu(outputs[:, :, out_size[2] // 2, out_size[3] // 2]).sum()
        grad = torch.autograd.grad(central_point, samples)[0]
        contribution = torch.nn.functional.relu(grad).sum((0, 1)).cpu().numpy()
        if np.isnan(np.sum(contribution)):
            continue
        total = contribution.astype(np.float64) if total is None else total + contribution
        seen += 1
    return total / seen


def float64_check(model, features, fast: dict, size: int) -> str:
    """How far each float32 path is from the float64 map (one noise image at ``size``): the float32 noise floor."""
    import copy

    def plain(module, dtype, x):
        xb = x.to(dtype).clone().requires_grad_(True)
        with frozen_eval(module):
            f = features(module, xb)
            h, w = f.shape[-2:]
            (g,) = torch.autograd.grad(torch.relu(f[:, :, h // 2, w // 2]).sum(), xb)
        return torch.relu(g).sum(1)[0].double().numpy()

    double = copy.deepcopy(model).double()
    found = {"published": [], "erf-tools": []}
    for seed in range(3):
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
        truth = plain(double, torch.float64, x)
        for key, m in (("published", plain(model, torch.float32, x)),
                       ("erf-tools", measure_erf(model, x, batch_size=1, **fast).map)):
            found[key].append((np.abs(m - truth).max() / truth.max(), pearson(m, truth)))

    def distance(key):
        rel, corr = zip(*found[key])
        return f"max rel {', '.join(f'{r:.1e}' for r in rel)}; Pearson ≥ {min(corr):.7f}"

    return (f"Float32 noise floor at {size}×{size} (3 noise images, each vs its float64 map): published loop "
            f"{distance('published')}; erf-tools fast paths {distance('erf-tools')}.")


def _stage4(model, x):
    return model.forward_intermediates(x, indices=[3], stop_early=True, intermediates_only=True)[0]


def _forward_features(model, x):
    return model.forward_features(x)


FAST_PATHS = {
    "resnet50": dict(channels_last=True, fold_bn=True),
    "replknet_31b": dict(channels_last=True, reparameterize=True, fold_bn=True, fft_depthwise=27),
    # NHWC saves UniConvNet's permute copies (its DCN works channels-last); workers=2 measured slower (RESULTS.md)
    "uniconvnet_t": dict(channels_last=True, fold_bn=True),
}


def engine_cases(args, precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[tuple[str, int, int, str, dict]]:
    """(model, input size, batch, precision, fast paths) of the engine benchmarks (overhead, targets,
    backward-split): resnet50 @224 at ``--batch-size`` in each of ``precisions``, RepLKNet-31B and UniConvNet-T at
    ``--size``, batch 1, fp32; less the models ``--models`` leaves out."""
    cases = [("resnet50", 224, args.batch_size, precision, FAST_PATHS["resnet50"]) for precision in precisions]
    cases += [(name, args.size, 1, "fp32", FAST_PATHS[name]) for name in ("replknet_31b", "uniconvnet_t")]
    return [case for case in cases if not args.models or case[0] in args.models]


def case_inputs(args, name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The active-init model and the seeded noise images of a case (``--images`` at 224, ``--large-images`` above)."""
    count = args.images if size <= 224 else args.large_images
    return active_model(name), torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def cmd_replknet_loop(args) -> dict[str, str]:
    """One section per model (``replknet-loop-<model>``), so that models can be re-measured separately."""
    folder = sample_folder(args.images, f"images{args.images}")
    out = {}
    for name in args.models:
        sections = [
            f"## erf-tools vs the published RepLKNet ERF loop: {name} @1024 (issue 8, benchmark 2"
            f"{'; ' + args.tag.strip('-') if args.tag else ''})",
            "",
            f"Command: `{command_line()}`  ",
            f"Machine: {machine()}",
            "",
            f"{args.images} images (`bench/out/images{args.images}`), RepLKNet protocol at 1024×1024, fp32. Baseline: "
            "the loop of RepLKNet-pytorch `erf/visualize_erf.py` re-implemented from the protocol (batch 1, NCHW, "
            "training-time structure, trainable parameters, torchvision transforms). erf-tools: `measure_erf` with "
            "the listed exact fast paths (float32 throughout; maps equal to float rounding). Medians of "
            f"{args.rounds} rounds; ratios within rounds."
            + (" DCNv3 core: grid_sample in the published loop (the official op has no CPU kernel), the default "
               "(fused C++ kernel on CPU) in erf-tools." if name.startswith("uniconvnet") else ""),
        ]
        model = active_model(name)
        features = _forward_features if name.startswith("replknet") else _stage4
        fast = FAST_PATHS.get(name, dict(channels_last=True))
        label = f"erf-tools, batch {args.batch_size}, " + ", ".join(
            f"{k}={v}" if not isinstance(v, bool) else k for k, v in fast.items())
        def published():
            # UniConvNet's official DCNv3 has no CPU kernel; the baseline stands in with the grid_sample core, as
            # before the fused kernel existed (erf-tools runs the default: fused on CPU)
            from erf_tools.layers.dcnv3_fused import core_backend

            with core_backend("reference"):
                return published_loop(model, folder, args.images, features)

        configs = {
            "published loop": published,
            label: lambda: measure_erf(model, folder, protocol="replknet", num_images=args.images,
                                       batch_size=args.batch_size, **fast),
            "erf-tools defaults (batch 'auto', exact fast paths)": lambda: measure_erf(
                model, folder, protocol="replknet", num_images=args.images),
        }
        if args.plain:  # the former defaults: the module as given, batch 8 (here: all images in one batch)
            for size in (1, args.images):
                configs[f"erf-tools fast=False, batch {size}"] = (lambda size=size: measure_erf(
                    model, folder, protocol="replknet", num_images=args.images, batch_size=size, fast=False))
        bf16_label = f"erf-tools bf16 autocast, batch {args.batch_size}, same fast paths (not exact)"
        if args.bf16:
            configs[bf16_label] = lambda: measure_erf(model, folder, protocol="replknet", num_images=args.images,
                                                      batch_size=args.batch_size, precision="bf16", **fast)
        print(f"replknet-loop: {name} @1024, {args.images} images, {args.rounds} rounds")
        times = rounds(configs, args.rounds)
        rows = ratio_rows(times, "published loop", args.images)
        reference = times["published loop"]["value"]
        ours = times[label]["value"].map
        sections += ["", ratio_table(rows, "published"), "",
                     f"max \\|erf-tools − published\\| / max = "
                     f"{np.abs(ours - reference).max() / reference.max():.2e}; Pearson = {pearson(ours, reference):.8f}"]
        if args.bf16:
            half = times[bf16_label]["value"].map
            sections.append(f"bf16 map vs published: max rel {np.abs(half - reference).max() / reference.max():.2e}; "
                            f"Pearson = {pearson(half, reference):.6f}")
        if args.check64:
            sections.append(float64_check(model, features, fast, args.check64))
        del model
        out[f"replknet-loop-{name}{args.tag}"] = "\n".join(sections)
    return out


# --- 3. overhead vs a bare loop --------------------------------------------------------------------------------------


def bare_loop(model, images: torch.Tensor, batch_size: int, precision: str, channels_last: bool, features) -> None:
    """The floor: forward to the target and one input-gradient of the centre objective per batch, nothing else
    (under reduced precision with the engine's precision policy, ``ERFEngine._precision_scope``: a numerical
    choice, not overhead)."""
    from erf_tools.engine.engine import ERFEngine

    policy = ERFEngine(model, [], None, "cpu", precision, channels_last)
    with frozen_eval(model):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].clone()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            with policy._precision_scope(x):
                f = features(model, x)
            h, w = f.shape[-2:]
            torch.autograd.grad(torch.relu(f[:, :, h // 2, w // 2].float()).sum(), x)


def cmd_overhead(args) -> str:
    lines = [
        "## Engine overhead vs a bare forward + input-gradient loop (issue 8, benchmark 3)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}",
        "",
        "Same model copy (the engine's `prepare_model` output), same preprocessed tensors, batch, precision and "
        "layout (bf16: both with the stem and the stages at stride ≤ 8 in float32). The bare loop does only the forward to the target and "
        "`autograd.grad`; the engine adds the hooks, the early stop, the first-batch probes (receptive-field "
        "geometry, operator log), the per-sample ReLU/RGB reduction, NaN checks, the exact accumulation and "
        f"per-image maps. Medians of {args.rounds} rounds; overheads within rounds. "
        f"{args.images} images at 224, {args.large_images} at 1024.",
        "",
        "| model | input | batch | precision | fast paths | bare s | engine s | overhead (wall) | overhead (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, size, batch, precision, fast in engine_cases(args):
        model, images = case_inputs(args, name, size)
        targets = resolve_targets(model, None)
        work, _ = prepare_model(model, targets, (size, size), **fast)
        features = _forward_features if not name.startswith("uniconvnet") else _stage4
        configs = {
            "bare": lambda: bare_loop(work, images, batch, precision, fast.get("channels_last", False), features),
            "engine": lambda: measure_erf(work, images, batch_size=batch, precision=precision,
                                          channels_last=fast.get("channels_last", False)),
        }
        print(f"overhead: {name} @{size}, {precision}")
        times = rounds(configs, args.rounds)
        bare_wall, eng_wall = (statistics.median(times[k]["wall"]) for k in ("bare", "engine"))
        over_wall = statistics.median(e / b - 1 for b, e in zip(times["bare"]["wall"], times["engine"]["wall"]))
        over_cpu = statistics.median(e / b - 1 for b, e in zip(times["bare"]["cpu"], times["engine"]["cpu"]))
        lines.append(f"| {name} | {size} | {batch} | {precision} | {', '.join(fast)} | {bare_wall:.2f} | "
                     f"{eng_wall:.2f} | **{100 * over_wall:+.1f} %** | {100 * over_cpu:+.1f} % |")
    lines += ["", "Both use the model copy made once by `prepare_model` (a `measure_erf` call with fast-path flags "
              "makes that copy itself: a deep copy, `structural_reparam()` and a BN-folding probe on the meta "
              "device, a one-off cost per call that is not included here)."]
    return "\n".join(lines)


# --- 4. several targets from one pass --------------------------------------------------------------------------------


def cmd_targets(args) -> str:
    lines = [
        "## Four stage targets from one pass vs one target (issue 8, benchmark 4"
        + ("; issue 18: batched VJP, the defaults)" if args.tag else ")"),
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}",
        "",
        "`targets=['stage:0', ..., 'stage:3']` (one forward, one backward per target with the graph kept) against "
        f"`targets='stage:3'`, same images and settings. Medians of {args.rounds} rounds, ratios within rounds. "
        "*Whole run*: wall time of the whole call. *Steady state*: wall time after the first batch per image "
        "(`timing['engine']['first_batch_seconds']`): the first batch also runs the one-off probes, and computes "
        "early targets on the full input to check their receptive-field window before adopting it. *Batched VJP*: "
        "the same four targets with `batched_vjp=True` (one backward pass vmapped over the four one-hot "
        "cotangents, `is_grads_batched`) instead of one backward per target.",
        "",
        "| model | input | images | batch | precision | 4 targets / 1 target: whole run (wall) | (CPU) | "
        "steady state (wall) | 4 separate runs / 1 target (CPU) | batched VJP: 4 targets / 1 (wall) | (CPU) | "
        "max rel. diff batched vs sequential |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, size, batch, precision, fast in engine_cases(args):
        model, images = case_inputs(args, name, size)
        count = images.shape[0]
        stages = [f"stage:{i}" for i in range(4)]
        configs = {
            "one": lambda: measure_erf(model, images, targets="stage:3", batch_size=batch, precision=precision,
                                       **fast),
            "four": lambda: measure_erf(model, images, targets=stages, batch_size=batch, precision=precision,
                                        **fast),
            "four batched": lambda: measure_erf(model, images, targets=stages, batch_size=batch,
                                                precision=precision, batched_vjp=True, **fast),
        }
        extra = {f"stage:{i} alone": (lambda i=i: measure_erf(model, images, targets=f"stage:{i}", batch_size=batch,
                                                             precision=precision, **fast)) for i in range(3)}
        print(f"targets: {name} @{size}, {precision}")
        times = rounds(configs | extra, args.rounds)
        wall = statistics.median(f / o for o, f in zip(times["one"]["wall"], times["four"]["wall"]))
        cpu = statistics.median(f / o for o, f in zip(times["one"]["cpu"], times["four"]["cpu"]))
        steady = statistics.median(f / o for o, f in zip(times["one"]["steady"], times["four"]["steady"]))
        separate = (sum(statistics.median(times[k]["cpu"]) for k in extra) + statistics.median(times["one"]["cpu"])) \
            / statistics.median(times["one"]["cpu"])
        batched_wall = statistics.median(f / o for o, f in zip(times["one"]["wall"], times["four batched"]["wall"]))
        batched_cpu = statistics.median(f / o for o, f in zip(times["one"]["cpu"], times["four batched"]["cpu"]))
        difference = max(float(np.abs(b.map - s.map).max() / np.abs(s.map).max())
                         for s, b in zip(times["four"]["value"], times["four batched"]["value"]))
        lines.append(f"| {name} | {size} | {count} | {batch} | {precision} | **{wall:.2f}×** | {cpu:.2f}× | "
                     f"**{steady:.2f}×** | {separate:.2f}× | **{batched_wall:.2f}×** | {batched_cpu:.2f}× | "
                     f"{difference:.1e} |")
    return "\n".join(lines)


def steady_seconds_per_image(result) -> float:
    """Wall seconds per image after the first batch of a ``measure_erf`` call (nan for anything else, or when the
    run had a single batch)."""
    results = result if isinstance(result, list) else [result]
    if not results or not hasattr(results[0], "timing") or "first_batch_seconds" not in results[0].timing["engine"]:
        return float("nan")
    engine, count = results[0].timing["engine"], results[0].num_images
    rest = count - engine.get("first_batch_images", count)
    return (results[0].timing["seconds"] - engine["first_batch_seconds"]) / rest if rest else float("nan")


def cmd_backward_split(args) -> str:
    """Forward to the last stage, then one input-gradient per stage target from that one graph (full input, no
    windows, the engine's fast-path model copy): the lower bound of any one-forward, one-backward-per-target pass."""
    lines = [
        "## Why four targets cost more than 1.6× one: forward and per-target backward times (issue 8, benchmark 4)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}",
        "",
        "One forward to stage 3 (`forward_intermediates`, graph kept), then `autograd.grad` of each stage's centre "
        "objective (ReLU of the centre unit summed over channels) from the same graph, full input, best of "
        f"{args.rounds}. *Floor* = (F + B3 + B2 + B1 + B0) / (F + B3): what one forward and one backward per target "
        "costs relative to one target, whatever the implementation; the engine only improves on it where an early "
        "target's receptive field fits a window of the input.",
        "",
        "| model | input | batch | F s | B3 s | B2 s | B1 s | B0 s | floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, size, batch, _precision, fast in engine_cases(args, precisions=("fp32",)):
        model = active_model(name)
        work, _ = prepare_model(model, resolve_targets(model, [f"stage:{i}" for i in range(4)]), (size, size), **fast)
        best: dict[str, float] = {}
        print(f"backward-split: {name} @{size}")
        with frozen_eval(work):
            for _ in range(args.rounds):
                x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                wall, _, feats = timed(lambda: work.forward_intermediates(
                    x, indices=[0, 1, 2, 3], stop_early=True, intermediates_only=True))
                best["F"] = min(best.get("F", wall), wall)
                for k in (3, 2, 1, 0):
                    f = feats[k]
                    h, w = f.shape[-2:]
                    objective = torch.relu(f[:, :, h // 2, w // 2]).sum()
                    wall, _, _ = timed(lambda: torch.autograd.grad(objective, x, retain_graph=k > 0))
                    best[f"B{k}"] = min(best.get(f"B{k}", wall), wall)
                del feats
        floor = (best["F"] + sum(best[f"B{k}"] for k in range(4))) / (best["F"] + best["B3"])
        lines.append(f"| {name} | {size} | {batch} | " + " | ".join(f"{best[k]:.2f}" for k in
                     ("F", "B3", "B2", "B1", "B0")) + f" | **{floor:.2f}×** |")
    return "\n".join(lines)


# --- 5. memory -------------------------------------------------------------------------------------------------------


def _rss_child(name: str, size: int, batch: int, fast: dict, precision: str) -> None:
    """Child process: build the model, note the RSS, run one engine batch, print the peak RSS growth."""
    import resource

    model = active_model(name)
    work, _ = prepare_model(model, resolve_targets(model, None), (size, size), **fast)
    del model
    images = torch.randn(batch, 3, size, size)
    with open("/proc/self/status") as handle:
        base = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS"))
    measure_erf(work, images, batch_size=batch, precision=precision, keep_per_image=False,
                channels_last=fast.get("channels_last", False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak}))


def cmd_memory(args) -> str:
    from erf_tools.engine.memory import auto_batch_size, per_image_memory

    gib = 2.0 ** 30
    lines = [
        "## Peak memory per image at 1024 and the automatic batch size (issue 8, benchmark 5)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}",
        "",
        "Estimate: `erf_tools.engine.memory.per_image_memory` replays one engine batch on the meta device (fp32) or with "
        "fake tensors (bf16 autocast) and tracks live tensor storage, for batch 1 and 2 (weights excluded). "
        "Measured: peak RSS growth of a child process running one real `measure_erf` batch (after building the "
        "model), batch 1 and 2; per image = the difference.",
        "",
        "| model | precision | fast paths | estimate: per image | estimate: fixed | estimate time | "
        "measured RSS: batch 1 | batch 2 | per image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    budgets = [16 * 2**30, 80 * 2**30, 141 * 2**30]
    autos = []
    for name in args.models or ["uniconvnet_t", "replknet_31b"]:
        model = active_model(name)
        for precision, fast in (("fp32", {}), ("fp32", FAST_PATHS.get(name, {})), ("bf16", FAST_PATHS.get(name, {}))):
            work, _ = prepare_model(model, resolve_targets(model, None), (args.size, args.size), **fast)
            wall, _, estimate = timed(lambda: per_image_memory(
                work, args.size, precision=precision, channels_last=fast.get("channels_last", False)))
            measured = ["–", "–", "–"]
            if precision == "fp32" and args.measure:
                peaks = []
                for batch in (1, 2):
                    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import bench_erf; "
                            f"bench_erf._rss_child({name!r}, {args.size}, {batch}, {fast!r}, {precision!r})")
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                    data = json.loads(out.stdout.strip().splitlines()[-1])
                    peaks.append((data["peak_kib"] - data["base_kib"]) * 1024)
                measured = [f"{peaks[0] / gib:.2f} GiB", f"{peaks[1] / gib:.2f} GiB",
                            f"{(peaks[1] - peaks[0]) / gib:.2f} GiB"]
            lines.append(f"| {name} | {precision} | {', '.join(fast) or 'none'} | {estimate.per_image / gib:.2f} GiB | "
                         f"{estimate.fixed / gib:.2f} GiB | {wall:.1f} s | " + " | ".join(measured) + " |")
            for budget in budgets:
                size = auto_batch_size(work, args.size, budget, precision=precision,
                                       channels_last=fast.get("channels_last", False))
                autos.append(f"| {name} | {precision} | {', '.join(fast) or 'none'} | {budget / gib:.0f} GiB | {size} |")
    lines += ["", "`auto_batch_size(model, 1024, budget)` (headroom 0.85):", "",
              "| model | precision | fast paths | budget | batch size |", "|---|---|---|---|---|", *autos]
    return "\n".join(lines)


# --- profiles --------------------------------------------------------------------------------------------------------


def profile_table(fn, rows: int = 12) -> tuple[str, float]:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall, _, _ = timed(fn)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | self CPU s | share | calls |", "|---|---|---|---|"]
    for event in events[:rows]:
        lines.append(f"| `{event.key}` | {event.self_cpu_time_total / 1e6:.2f} | "
                     f"{100 * event.self_cpu_time_total / total:.1f} % | {event.count} |")
    return "\n".join(lines), wall


def cmd_profile(args) -> str:
    sections = [
        "## Where the time goes (torch.profiler, issue 8)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}",
        "",
        "Self CPU time per operator for one measurement (after a warm-up call), top rows.",
    ]
    cases = {
        "resnet50 @224, 16 images, batch 1, NCHW fp32 (OpenERF-like)":
            ("resnet50", 224, 16, dict(batch_size=1, protocol="kim2023")),
        "resnet50 @224, 16 images, batch 16, channels_last + fold_bn, fp32":
            ("resnet50", 224, 16, dict(batch_size=16, protocol="kim2023", channels_last=True, fold_bn=True)),
        "resnet50 @224, 16 images, batch 16, channels_last + fold_bn, bf16":
            ("resnet50", 224, 16, dict(batch_size=16, protocol="kim2023", channels_last=True, fold_bn=True,
                                       precision="bf16")),
        f"replknet_31b @{args.size}, 1 image, NCHW, training-time structure (published settings)":
            ("replknet_31b", args.size, 1, dict(batch_size=1)),
        f"replknet_31b @{args.size}, 1 image, {', '.join(FAST_PATHS['replknet_31b'])}":
            ("replknet_31b", args.size, 1, dict(batch_size=1, **FAST_PATHS["replknet_31b"])),
        f"uniconvnet_t @{args.size}, 1 image, channels_last + fold_bn":
            ("uniconvnet_t", args.size, 1, dict(batch_size=1, **FAST_PATHS["uniconvnet_t"])),
    }
    for title, (name, size, count, kwargs) in cases.items():
        if args.models and name not in args.models:
            continue
        model = active_model(name)
        images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
        print(f"profile: {title}")
        table, wall = profile_table(lambda: measure_erf(model, images, **kwargs))
        sections += ["", f"### {title}", "", f"{wall:.2f} s wall for {count} image(s) under the profiler.", "", table]
    return "\n".join(sections)


# --- issue 18: the fused DCNv3 CPU core -------------------------------------------------------------------------------

#: UniConvNet-T: (channels, blocks) per stage; maps at size/4, /8, /16, /32; 16 channels per DCN group.
UNICONVNET_T_STAGES = ((64, 3), (128, 3), (256, 15), (512, 3))


def dcnv3_core_inputs(channels: int, side: int, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], int]:
    """Random (value, offset, mask) of one UniConvNet-T DCN core at a ``side``² map: offsets of about a pixel and
    a raw mask of about 0.3, as under the all-branches-active init."""
    group = channels // 16
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(1, side, side, channels, generator=g)
    offset = torch.randn(1, side, side, group * 18, generator=g)
    mask = torch.randn(1, side, side, group * 9, generator=g) * 0.3
    return (value, offset, mask), group


def dcnv3_core_pass(backend: str, inputs, group: int) -> dict:
    """Forward and backward (value, offset and mask gradients) of ``dcnv3_core`` with ``backend``; wall and CPU s."""
    from erf_tools.layers.dcnv3 import dcnv3_core
    from erf_tools.layers.dcnv3_fused import core_backend

    leaves = [t.clone().requires_grad_(True) for t in inputs]
    cotangent = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))  # same for every dtype
    cotangent = cotangent.to(inputs[0].device, inputs[0].dtype)
    with core_backend(backend):
        cpu, start = time.process_time(), time.perf_counter()
        out = dcnv3_core(*leaves, group)
        middle = time.perf_counter()
        grads = torch.autograd.grad(out, leaves, cotangent)
        end, cpu = time.perf_counter(), time.process_time() - cpu
    return {"forward": middle - start, "backward": end - middle, "total": end - start, "cpu": cpu,
            "out": out.detach(), "grads": grads}


def float32_accuracy(result: dict, truth: dict) -> tuple[float, int]:
    """(max relative error of the output and the value/mask gradients, offset-gradient elements off by > 1e-3)."""
    def rel(a, b):
        return (a.double() - b).abs() / b.abs().max()

    smooth = [(result["out"], truth["out"]), (result["grads"][0], truth["grads"][0]),
              (result["grads"][2], truth["grads"][2])]
    flips = int((rel(result["grads"][1], truth["grads"][1]) > 1e-3).sum())
    return max(rel(a, b).max().item() for a, b in smooth), flips


def cmd_dcnv3_core(args) -> str:
    """Old (grid_sample) vs fused DCNv3 core at UniConvNet-T's four stage shapes, interleaved rounds."""
    from erf_tools.layers.dcnv3_fused import fused_core_available

    if not fused_core_available():
        raise SystemExit("dcnv3-core: the fused extension cannot be built here")
    backends = {"grid_sample (old)": "reference", "fused C++": "fused"}
    lines = [
        "## Fused DCNv3 core vs the grid_sample core: UniConvNet-T stage shapes (issue 18, item 1)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}",
        "",
        f"`dcnv3_core` forward and backward (gradients of value, offset and mask for a random cotangent) on random "
        f"float32 inputs of the shape each stage of UniConvNet-T has at {args.size}×{args.size} input (batch 1, 16 "
        "channels per group, offsets ~1 px, mask ~0.3), both paths in the same process. Each round runs both paths "
        f"once per stage in a rotated order; medians of {args.rounds} rounds (after one warm-up round), ratios "
        "within rounds. *Per pass* sums stage × blocks (3, 3, 15, 3): the core time of one UniConvNet-T forward + "
        "backward. Accuracy of each float32 path against the float64 core on the same inputs: *max rel err* = max "
        "|error| / max |float64| over the output and the value and mask gradients; *∂offset flips* = offset-gradient "
        "elements off by more than 1e-3 of the maximum: samples within float32 rounding (~1e-5 px) of a pixel "
        "boundary, where the bilinear derivative jumps and either path may land in the neighbouring cell.",
        "",
        "| stage | map (C×H×W) | blocks | path | forward s | backward s | total s | CPU s | speed-up (total, wall) "
        "| (CPU) | max rel err | ∂offset flips |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_pass = {name: [] for name in backends}
    per_pass_cpu = {name: [] for name in backends}
    for index, (channels, blocks) in enumerate(UNICONVNET_T_STAGES):
        side = args.size // 2 ** (index + 2)
        inputs, group = dcnv3_core_inputs(channels, side, seed=index)
        names = list(backends)
        for name in names:  # warm-up (and the one build)
            dcnv3_core_pass(backends[name], inputs, group)
        times = {name: [] for name in names}
        last = {}
        for r in range(args.rounds):
            for name in names[r % 2:] + names[:r % 2]:
                result = dcnv3_core_pass(backends[name], inputs, group)
                last[name] = result
                times[name].append(result)
            print(f"  stage {index} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {times[n][-1]['total']:.3f} s" for n in names) + f" (load {os.getloadavg()[0]:.1f})")
        truth = dcnv3_core_pass("fused", [t.double() for t in inputs], group)  # = the float64 reference to 1e-14
        accuracy = {name: float32_accuracy(last[name], truth) for name in names}
        for name in names:
            med = {k: statistics.median(t[k] for t in times[name]) for k in ("forward", "backward", "total", "cpu")}
            ratio = statistics.median(o["total"] / t["total"] for o, t in zip(times[names[0]], times[name]))
            cpu_ratio = statistics.median(o["cpu"] / t["cpu"] for o, t in zip(times[names[0]], times[name]))
            per_pass[name].append([t["total"] * blocks for t in times[name]])
            per_pass_cpu[name].append([t["cpu"] * blocks for t in times[name]])
            lines.append(f"| {index} | {channels}×{side}×{side} | {blocks} | {name} | {med['forward']:.4f} | "
                         f"{med['backward']:.4f} | {med['total']:.4f} | {med['cpu']:.4f} | "
                         f"{'**' + format(ratio, '.2f') + '×**' if name != names[0] else '1.00×'} | "
                         f"{cpu_ratio:.2f}× | {accuracy[name][0]:.1e} | {accuracy[name][1]} |")
    totals = {name: [sum(stage[r] for stage in per_pass[name]) for r in range(args.rounds)] for name in backends}
    totals_cpu = {name: [sum(stage[r] for stage in per_pass_cpu[name]) for r in range(args.rounds)]
                  for name in backends}
    old_name, new_name = list(backends)
    ratio = statistics.median(o / n for o, n in zip(totals[old_name], totals[new_name]))
    cpu_ratio = statistics.median(o / n for o, n in zip(totals_cpu[old_name], totals_cpu[new_name]))
    lines += ["", "| per UniConvNet-T pass (24 blocks) | old total s | fused total s | speed-up (wall) | (CPU) |",
              "|---|---|---|---|---|",
              f"| core, forward + backward | {statistics.median(totals[old_name]):.3f} | "
              f"{statistics.median(totals[new_name]):.3f} | **{ratio:.2f}×** | {cpu_ratio:.2f}× |"]
    return "\n".join(lines)


# --- issue 18: one short run on a CUDA machine -----------------------------------------------------------------------

#: Dense peak TFLOP/s (fp32 on CUDA cores, TF32 and bf16 on tensor cores) by device-name fragment, from the vendor
#: data sheets (SXM parts); the fraction of peak is reported only for the devices listed.
GPU_PEAK_TFLOPS = {"H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
                   "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
                   "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}


def preprocessed_images(count: int, size: int) -> torch.Tensor:
    """The bundled sample photographs (and seeded crops) as RepLKNet-protocol tensors, decoded once, so that the
    timed runs measure the device and not PNG decoding: bicubic resize to ``size``², ImageNet mean/std."""
    from PIL import Image
    from torchvision import transforms

    folder = sample_folder(count, f"images{count}")
    transform = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    tensors = []
    for path in sorted(folder.glob("*.png"))[:count]:
        with Image.open(path) as image:
            tensors.append(transform(image.convert("RGB")))
    return torch.stack(tensors)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_run(fn: Callable[[], object], device: str) -> tuple[float, float, object]:
    """(wall seconds, peak device memory in GiB (nan off CUDA), value) of ``fn`` on ``device``."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = fn()
    _synchronize(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return wall, peak, value


def pass_flops(model: torch.nn.Module, size: int, device: str) -> float:
    """FLOPs of one forward + input-gradient pass of one image (torch's FlopCounterMode: convolutions and matrix
    products; grid_sample and elementwise work are not counted, so the fraction of peak is a lower bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device=device, requires_grad=True)
    with _frozen_eval(model), FlopCounterMode(display=False) as counter:
        features = model.forward_features(x)
        features.float().square().sum().backward()  # (autograd.grad is unsupported under FlopCounterMode)
    return float(counter.get_total_flops())


def gpu_equality_checks(device: str, size: int) -> list[str]:
    """Small cases: the DCNv3 core (float64, value/offset/mask gradients; the ``auto`` path on ``device``, i.e. the
    Triton kernels where triton is installed, and the grid_sample reference, each vs the CPU kernel) and
    measure_erf of the three models (2 images, fp32 without TF32) on CPU vs ``device``."""
    from erf_tools.layers.dcnv3 import core_path
    from erf_tools.layers.dcnv3_fused import core_backend

    rows = ["| check | max \\|device − CPU\\| / max | Pearson |", "|---|---|---|"]
    inputs, group = dcnv3_core_inputs(64, 24, seed=5)
    inputs = [t.double() for t in inputs]
    on_device = [t.to(device) for t in inputs]
    with core_backend("auto"):
        cpu_path, auto_path = core_path(*inputs), core_path(*on_device)
    cpu = dcnv3_core_pass("auto", inputs, group)  # the fused C++ kernel on CPU
    for backend, path in (("auto", auto_path), ("reference", "reference")):
        dev = dcnv3_core_pass(backend, on_device, group)
        for name, a, b in zip(("output", "∂value", "∂offset", "∂mask"), (dev["out"], *dev["grads"]),
                              (cpu["out"], *cpu["grads"])):
            a = a.cpu()
            rel = (a - b).abs().max().item() / b.abs().max().item()
            rows.append(f"| DCNv3 core float64 ({path} on {device} vs {cpu_path} on CPU), {name} | {rel:.1e} | "
                        f"{pearson(a.numpy(), b.numpy()):.10f} |")
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name in ("resnet50", "replknet_31b", "uniconvnet_t"):
        model = active_model(name)
        maps = []
        for where in ("cpu", device):
            maps.append(measure_erf(model.to(where), images, batch_size=2, device=where).map)
        rel = np.abs(maps[1] - maps[0]).max() / maps[0].max()
        rows.append(f"| measure_erf {name} @{size}, 2 images, fp32 | {rel:.1e} | {pearson(maps[1], maps[0]):.8f} |")
        del model
    return rows


def core_path_on(device: str) -> str:
    """The DCNv3 core that ``auto`` runs on ``device`` for float32 inputs (triton, fused or reference)."""
    from erf_tools.layers.dcnv3 import core_path
    from erf_tools.layers.dcnv3_fused import core_backend

    probe = torch.zeros(1, device=device)
    with core_backend("auto"):
        return core_path(probe, probe, probe)


def cmd_gpu(args) -> dict[str, str]:
    """GPU equals CPU on small cases; UniConvNet-T and RepLKNet-31B at ``--size`` × ``--gpu-images`` in fp32 /
    tf32 / bf16; ResNet-50 @224 vs OpenERF when installed. Skips (no section, exit 0) without CUDA."""
    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu: skipped: no CUDA device (torch.cuda.is_available() is False); nothing measured or written")
        return {}
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    peaks = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    # fp32 means fp32: no TF32 in cuDNN convolutions (PyTorch's default) nor in matmuls; the tf32 rows allow both.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    lines = [
        "## GPU: equality with the CPU and throughput (issue 18, item 5)",
        "",
        f"Command: `{command_line()}`  ",
        f"Device: {name}; torch {torch.__version__}, timm {timm.__version__}; host: {machine()}",
        "",
        f"### GPU equals CPU (small cases, {args.check_size} px)",
        "",
        *gpu_equality_checks(device, args.check_size),
        "",
        f"### Throughput at {args.size} px, {args.gpu_images} images (sample photographs, decoded beforehand)",
        "",
        f"`measure_erf(model, images, device={device!r}, batch_size={args.gpu_batch}, <exact fast paths>)`, "
        "RepLKNet protocol, after a warm-up call on 2 images (cuDNN autotuning). fp32: TF32 off; tf32: TF32 on in "
        "convolutions and matmuls (PyTorch's default for cuDNN); bf16: autocast. Peak = "
        "`torch.cuda.max_memory_allocated`. TFLOP counted by FlopCounterMode (convolutions and matmuls only, "
        "so the fraction of peak is a lower bound). DCNv3 on the GPU: the "
        f"{core_path_on(device)} core.",
        "",
        "| model | precision | batch | wall s | images/s | peak GiB | TFLOP/s (counted) | % of peak | Pearson to fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    images = preprocessed_images(args.gpu_images, args.size)
    for model_name in args.models or ("uniconvnet_t", "replknet_31b"):
        model = active_model(model_name).to(device)
        fast = FAST_PATHS.get(model_name, {})
        flops = pass_flops(model, args.size, device)
        reference = None
        for precision in ("fp32", "tf32", "bf16"):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            amp = "bf16" if precision == "bf16" else "fp32"

            def run(count):
                return measure_erf(model, images[:count], device=device, batch_size=args.gpu_batch,
                                   precision=amp, keep_per_image=False, **fast)

            device_run(lambda: run(min(2, args.gpu_images)), device)  # warm-up
            wall, peak, result = device_run(lambda: run(args.gpu_images), device)
            reference = result.map if precision == "fp32" else reference
            achieved = flops * args.gpu_images / wall / 1e12
            share = f"{100 * achieved / peaks[precision]:.1f} %" if peaks else "–"
            lines.append(f"| {model_name} | {precision} | {args.gpu_batch} | {wall:.2f} | {args.gpu_images / wall:.2f} | "
                         f"{peak:.2f} | {achieved:.1f} | {share} | {pearson(result.map, reference):.6f} |")
            print(lines[-1], flush=True)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        lines.append(f"| {model_name}: {flops / 1e12:.3f} TFLOP counted per image (forward + input gradient) "
                     "| | | | | | | | |")
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    lines += ["", *gpu_openerf_rows(device)]
    lines += ["", f"Whole run: {time.perf_counter() - started:.0f} s."]
    return {"gpu": "\n".join(lines)}


def gpu_openerf_rows(device: str) -> list[str]:
    """ResNet-50 @224, Kim protocol, 32 sample images: OpenERF (batch 1) vs measure_erf, on ``device``."""
    try:
        import openerf
    except ImportError:
        return ["ResNet-50 @224 vs OpenERF: skipped (openerf is not installed in this environment)."]
    folder = sample_folder(32, "images32")
    model = active_model("resnet50").to(device)
    fast = FAST_PATHS["resnet50"]
    configs = {
        "OpenERF (batch 1)": lambda: openerf.compute_erf(
            model, model_name="resnet50", image_dir=folder, max_images=32, target_layer="layer4", device=device,
            show_progress=False),
        "erf-tools fp32, batch 32": lambda: measure_erf(model, folder, protocol="kim2023", targets="layer4",
                                                        batch_size=32, device=device, **fast),
        "erf-tools bf16, batch 32": lambda: measure_erf(model, folder, protocol="kim2023", targets="layer4",
                                                        batch_size=32, device=device, precision="bf16", **fast),
    }
    rows = ["ResNet-50 @224, Kim et al. protocol, 32 sample images (decoding included), after one warm-up call:",
            "", "| configuration | wall s | images/s | × OpenERF |", "|---|---|---|---|"]
    walls = {}
    for label, fn in configs.items():
        device_run(fn, device)
        walls[label], _, _ = device_run(fn, device)
    base = walls["OpenERF (batch 1)"]
    rows += [f"| {label} | {wall:.2f} | {32 / wall:.1f} | {base / wall:.2f}× |" for label, wall in walls.items()]
    return rows


COMMANDS = {"openerf": cmd_openerf, "replknet-loop": cmd_replknet_loop, "overhead": cmd_overhead,
            "targets": cmd_targets, "backward-split": cmd_backward_split, "memory": cmd_memory, "profile": cmd_profile,
            "dcnv3-core": cmd_dcnv3_core, "gpu": cmd_gpu}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=None, help="images (default 32 at 224, 4 at 1024)")
    parser.add_argument("--large-images", type=int, default=2, help="images for the 1024 cases of overhead/targets")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 at 224, 1 at 1024")
    parser.add_argument("--bf16-batch-size", type=int, default=16, help="openerf: batch of the bf16 run")
    parser.add_argument("--size", type=int, default=1024, help="input size of the RepLKNet/UniConvNet cases")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--measure", action="store_true", help="memory: also measure peak RSS (slow)")
    parser.add_argument("--check64", type=int, default=0, help="replknet-loop: float64 check at this size")
    parser.add_argument("--bf16", action="store_true", help="replknet-loop: also run bf16 autocast")
    parser.add_argument("--plain", action="store_true",
                        help="replknet-loop: also run without fast paths at batch 1 and with all images in one batch")
    parser.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    parser.add_argument("--tag", default="", help="suffix of the RESULTS.md section name (a new section beside the "
                        "earlier one)")
    parser.add_argument("--device", default=None, help="gpu: the device (default cuda; cpu for a dry run)")
    parser.add_argument("--gpu-images", type=int, default=50, help="gpu: images per throughput run")
    parser.add_argument("--gpu-batch", type=int, default=8, help="gpu: batch size of the throughput runs")
    parser.add_argument("--check-size", type=int, default=128, help="gpu: input size of the CPU-vs-GPU checks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.images is None:
        args.images = 4 if args.command == "replknet-loop" else 32
    if args.batch_size is None:
        args.batch_size = 1 if args.command == "replknet-loop" else 8
    if args.command == "replknet-loop" and not args.models:
        args.models = ["replknet_31b", "uniconvnet_t"]
    OUT.mkdir(parents=True, exist_ok=True)
    text = COMMANDS[args.command](args)
    sections = text if isinstance(text, dict) else {args.command + args.tag: text}
    for name, body in sections.items():
        print(body)
        if args.write:
            write_section(name, body)


if __name__ == "__main__":
    main()
