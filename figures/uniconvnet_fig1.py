"""UniConvNet's Figure-1 line-up: ResNet-101, SLaK-T, UniRepLKNet-T and UniConvNet-T on one colour scale.

    .venv/bin/python figures/uniconvnet_fig1.py                          # published: 1024 px, 50 images (hours on CPU)
    .venv/bin/python figures/uniconvnet_fig1.py --size 256 --num-images 8   # a quick look (figures/README.md)
    .venv/bin/python figures/uniconvnet_fig1.py --weights-dir ~/checkpoints # trained networks, official file names

Every model is measured with the same protocol (RepLKNet's: Σ_c ReLU of the centre unit, ReLU'd input gradient
summed over RGB, mean over images) through :func:`erf_tools.runs.run_measure` with the exact fast paths, and drawn
with :func:`erf_tools.runs.run_compare`: ``uniconvnet_fig1.png`` (one shared log colour scale, fitted 1/2/3σ
ellipses, AGD score and interval and the weights on every panel), ``uniconvnet_fig1_radial.png`` and
``uniconvnet_fig1_scores.md``. Measured results are kept in ``--store`` and reused when their settings match.

Weights: by default what ``erf measure`` chooses (trained weights on disk or downloadable now, else the ``active``
architecture probe); ``--weights SPEC`` for every model (``pretrained``, ``active``, ...); ``--weights-dir DIR`` a
folder of checkpoints under the official file names of each model's pretrained configs (models without a file there
fall back to the default).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from erf_tools import runs
from erf_tools.pretrained import HF_DEFAULT_FILES, pretrained_sources
from erf_tools.results import ERFResult, load_result

HERE = Path(__file__).resolve().parent
NAME = "uniconvnet_fig1"
#: timm name -> display label, in the paper's order.
LABELS = {"resnet101": "ResNet-101", "slak_t": "SLaK-T", "unireplknet_t": "UniRepLKNet-T",
          "uniconvnet_t": "UniConvNet-T"}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


# ------------------------------------------------------------------------------------------------------- weights
def official_file_names(model: str) -> list[str]:
    """The file names a checkpoint of ``model`` is published under (its pretrained cfgs' hub files and URLs).

    Hub files with timm's generic names (``model.safetensors``) say nothing about the model, so they are only
    looked for in a sub-folder named after it (see :func:`checkpoint_in`).
    """
    names: list[str] = []
    for source in pretrained_sources(model):
        candidates = [*source.hf_candidates, source.filename or ""]
        if source.url:
            candidates.append(Path(source.url.split("?", 1)[0]).name)
        names += [name for name in candidates if name and name not in names]
    return names


def checkpoint_in(folder: Path, model: str) -> Path | None:
    """``model``'s checkpoint in ``folder``: an official file name, one in ``folder/model/``, or ``model.<ext>``
    (SLaK publishes no file name, only a Google-Drive id)."""
    names = official_file_names(model)
    candidates = [folder / n for n in names if n not in HF_DEFAULT_FILES]
    candidates += [folder / model / n for n in names]
    candidates += [folder / f"{model}{suffix}" for suffix in CHECKPOINT_SUFFIXES]
    return next((path for path in candidates if path.is_file()), None)


def weights_for(model: str, weights: str | None, weights_dir: Path | None) -> str | None:
    """The weights spec of ``model``: a checkpoint from ``weights_dir``, else ``weights`` (None: ``erf measure``'s
    default choice, resolved by :func:`erf_tools.runs.measure_settings`)."""
    if weights_dir is not None:
        found = checkpoint_in(weights_dir, model)
        if found is not None:
            return str(found)
        looked_for = ", ".join(official_file_names(model)) or "no official name"
        print(f"{model}: no checkpoint in {weights_dir} (looked for {looked_for} or {model}.pth); using "
              f"{weights or 'the default weights'}", flush=True)
    return weights


# ------------------------------------------------------------------------------------------------------ measuring
def _settings_key(settings: runs.MeasureSettings) -> dict:
    """What must agree for a saved result to stand for a new measurement (weights as resolved: spec or path)."""
    return {"protocol": settings.protocol, "input_size": settings.input_size, "num_images": settings.num_images,
            "images": settings.images, "weights": settings.weights, "seed": settings.seed,
            "precision": settings.precision, "targets": settings.targets}


def _key_path(store: Path, model: str) -> Path:
    return store / f"{runs.output_stem(model, None)}.fig1-settings.json"


def _saved(store: Path, settings: runs.MeasureSettings) -> ERFResult | None:
    """The stored result of these settings, or None (none saved, or made with other settings)."""
    key_path = _key_path(store, settings.model)
    stem = store / runs.output_stem(settings.model, None)
    if not key_path.is_file() or not stem.with_suffix(".npz").is_file():
        return None
    wanted = json.loads(json.dumps(_settings_key(settings)))  # as JSON reads it back (tuples become lists)
    return load_result(stem) if json.loads(key_path.read_text()) == wanted else None


def measure(model: str, settings: runs.MeasureSettings, store: Path, force: bool) -> ERFResult:
    """``model``'s ERF, reused from ``store`` when its settings match, else measured there (fast paths: exact)."""
    saved = None if force else _saved(store, settings)
    if saved is not None:
        print(f"{model:>14}: reusing the saved result", flush=True)
        return saved
    print(settings.describe(), flush=True)
    run = runs.run_measure(model, settings=settings, out=store, bootstrap=0, fast=True)
    # the key is written last, so an interrupted measurement is never mistaken for a finished one
    _key_path(store, model).write_text(json.dumps(_settings_key(settings)))
    print(f"{model:>14}: measured in {run.seconds:6.1f} s", flush=True)
    return run.result


# --------------------------------------------------------------------------------------------------------- script
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(LABELS), help="timm names (default: the line-up)")
    parser.add_argument("--size", type=int, default=1024, help="input size in px (default 1024, as published)")
    parser.add_argument("--num-images", type=int, default=50, help="images per model (default 50, as published)")
    parser.add_argument("--images", default="synthetic",
                        help="image source: synthetic (default, independent images), sample, noise or a folder")
    parser.add_argument("--weights", default=None,
                        help="weights of every model (pretrained[:TAG], active, random, PATH); default: what "
                             "`erf measure` chooses (trained when on disk, else the architecture probe)")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="folder of checkpoints under their official file names")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=runs.COMMAND_BOOTSTRAP,
                        help="bootstrap resamples for the score intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="measure again even if saved results match")
    parser.add_argument("--out", type=Path, default=HERE, help="where the figures and table go (default figures/)")
    parser.add_argument("--store", type=Path, default=None,
                        help="where measured results are kept (default OUT/results/fig1, not committed)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    store = args.store or args.out / "results" / "fig1"
    results = []
    for model in args.models:
        settings = runs.measure_settings(
            model, input_size=args.size, num_images=args.num_images, images=args.images,
            weights=weights_for(model, args.weights, args.weights_dir), batch_size=args.batch_size, seed=args.seed)
        result = measure(model, settings, store, args.force)
        result.model = LABELS.get(model, model)  # display names in titles, legends and the table
        results.append(result)
    compared = runs.run_compare(
        results, out=args.out, name=NAME, contours=True, bootstrap=args.bootstrap, table_format="markdown",
        table_path=args.out / f"{NAME}_scores.md",
        title=f"UniConvNet Fig. 1 line-up: ERFs on one log scale, fitted Gaussian 1/2/3σ, "
              f"AGD score [95 % interval]")
    for result, report in zip(compared.results, compared.reports):
        low, high = report.interval("agd_score")
        print(f"{result.model:>14}: AGD score {report.agd_score:.3f} [{low:.3f}, {high:.3f}]")
    for path in [*(p for files in compared.figures.values() for p in files), compared.table_path]:
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
