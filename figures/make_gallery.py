"""Make the figures/ gallery: five backbones' ERFs on one scale, radial profiles, AGD scores, UniConvNet-T stages.

    .venv/bin/python figures/make_gallery.py    # 19 min on the shared 2-core machine, 355 CPU-s (figures/README.md)

All models use the all-branches-active random init (``weights="active"``, seed 0): an architecture probe, not
trained networks (see figures/README.md for what that does and does not mean). Measured results are kept in
``figures/results/`` (not committed) and reused when their settings match; ``--force`` measures again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from erf_tools import catalogue, plotting, runs, tables
from erf_tools.analysis import analyze
from erf_tools.results import load_result

HERE = Path(__file__).resolve().parent
#: (timm name, label) in display order.
MODELS = (
    ("uniconvnet_t", "UniConvNet-T"),
    ("replknet_31b", "RepLKNet-31B"),
    ("resnet101", "ResNet-101"),
    ("parc_convnext_t", "ParC-ConvNeXt-T"),
    ("conv2former_t", "Conv2Former-T"),
)
STAGE_MODEL = "uniconvnet_t"


def _matches(path: Path, settings: runs.MeasureSettings) -> bool:
    """A saved result can be reused when it was made with the same protocol, size, images and weights."""
    json_path = path.with_name(path.name + ".json")
    if not json_path.is_file():
        return False
    meta = json.loads(json_path.read_text())
    return (meta.get("protocol") == settings.protocol and meta.get("num_images") == settings.num_images
            and list(meta.get("input_size", [])) == [settings.input_size] * 2
            and (meta.get("weights") or {}).get("source") == settings.weights
            and (meta.get("weights") or {}).get("seed") == settings.seed)


def measure_all(size: int, num_images: int, batch_size: int, force: bool) -> dict[str, list]:
    """Results per model (UniConvNet-T at every stage, the others at their ERF layer), measured or reused."""
    store = HERE / "results"
    measured: dict[str, list] = {}
    for model, label in MODELS:
        targets = catalogue.stage_targets(model) if model == STAGE_MODEL else None
        settings = runs.measure_settings(model, input_size=size, num_images=num_images, weights="active",
                                         targets=targets, batch_size=batch_size)
        stems = ([runs.output_stem(model, t) for t in targets] if targets else [runs.output_stem(model, None)])
        if not force and all(_matches(store / stem, settings) for stem in stems):
            measured[model] = [load_result(store / stem) for stem in stems]
            print(f"{label:>16}: reusing {len(stems)} saved result(s)", flush=True)
            continue
        started = time.perf_counter()
        run = runs.run_measure(model, settings=settings, out=store, bootstrap=0)
        measured[model] = run.results
        print(f"{label:>16}: measured in {time.perf_counter() - started:6.1f} s "
              f"({settings.num_images} images, {size} px, targets {targets or 'default'})", flush=True)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384, help="input size in px (default 384)")
    parser.add_argument("--num-images", type=int, default=6, help="sample images per model (default 6)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the score intervals")
    parser.add_argument("--force", action="store_true", help="measure again even if saved results match")
    parser.add_argument("--out", type=Path, default=HERE, help="where the PNGs and scores go (default figures/)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"torch threads: {torch.get_num_threads()}", flush=True)

    measured = measure_all(args.size, args.num_images, args.batch_size, args.force)
    labels = dict(MODELS)
    results = [measured[model][-1] for model, _ in MODELS]  # UniConvNet-T: its last stage = its ERF layer
    reports = [analyze(result, bootstrap=args.bootstrap) for result in results]
    for result in results:
        result.model = labels[result.model]  # display names in titles and tables

    out = args.out
    written = []
    written += plotting.save_figure(plotting.compare_figure(
        results, reports, scale="log", contours=True,
        title="ERFs of five backbones, log scale, fitted Gaussian 1/2/3σ"), out / "compare_log")
    written += plotting.save_figure(plotting.compare_figure(
        results, reports, scale="linear", squares=True,
        title="ERFs of five backbones, linear scale, r(t) squares"), out / "compare_linear")
    written += plotting.save_figure(plotting.radial_profile_figure(results), out / "radial_profiles")
    stage_results = measured[STAGE_MODEL]
    for result in stage_results:
        result.model = labels[STAGE_MODEL]
    written += plotting.save_figure(plotting.stage_grid(
        {labels[STAGE_MODEL]: stage_results}, title="UniConvNet-T: ERF growth across stages"),
        out / "uniconvnet_t_stages")
    rows = tables.scores_table(reports, results)
    written.append(tables.write_table(rows, out / "scores.md"))
    written.append(tables.write_table(rows, out / "scores.csv"))
    for path in written:
        print(f"wrote {path}")
    print(f"gallery done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
