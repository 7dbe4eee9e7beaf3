"""Measure (or take) an ERF, analyse it, and turn it into a :class:`~erf_tools.testing.snapshot.Snapshot`.

Defaults are small and seeded so that a check runs in seconds on a CPU: :data:`DEFAULT_MEASURE` (RepLKNet protocol,
128 px, 8 bundled sample photographs, seed 0) and :data:`DEFAULT_BOOTSTRAP` resamples for the intervals. Everything
that decides the numbers goes into the snapshot's settings (compared exactly); the device does not (the same check
gives the same verdict on CPU and GPU: float differences are far below the noise-derived tolerances).
torch is imported only when a model has to be measured.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .noise import centre_intervals
from .snapshot import MAP_SIDE, Snapshot, SnapshotMap
from .tolerances import report_fields

__all__ = ["DEFAULT_MEASURE", "DEFAULT_BOOTSTRAP", "Capture", "capture", "snapshot_of", "reduced_map",
           "weights_digest", "tensor_digest", "settings_of"]

#: Measurement defaults of a check (any :func:`erf_tools.measure_erf` keyword overrides them).
DEFAULT_MEASURE: dict[str, Any] = {"images": "sample", "protocol": "replknet", "input_size": 128, "num_images": 8,
                                   "seed": 0}
#: Bootstrap resamples of a check (the report's intervals and the centre's).
DEFAULT_BOOTSTRAP = 50
#: measure_erf keywords that do not change the numbers (beyond float rounding), so they are not settings.
NOT_SETTINGS = ("batch_size", "device", "progress", "workers", "prefetch", "memory_budget", "fast", "channels_last",
                "reparameterize", "fold_bn", "fft_depthwise", "batched_vjp", "partial_path", "checkpoint_every",
                "resume")


@dataclass
class Capture:
    """A measured and analysed ERF: the result, its report, and the snapshot made from them."""

    result: Any
    report: Any
    snapshot: Snapshot


def reduced_map(erf_map: Any, side: int = MAP_SIDE) -> SnapshotMap:
    """Block means of the map, ≤ ``side`` per side, divided by their maximum (a zero map stays zero)."""
    from erf_tools.analysis.maps import block_reduce

    array = np.asarray(erf_map, dtype=np.float64)
    factor = max(1, math.ceil(max(array.shape) / side))
    reduced = block_reduce(array, factor) if min(array.shape) >= factor else array
    peak = float(np.max(reduced)) if reduced.size else 0.0
    if peak > 0:
        reduced = reduced / peak
    return SnapshotMap(tuple(tuple(float(v) for v in row) for row in reduced), factor)


def weights_digest(module: Any) -> dict[str, Any]:
    """Parameter count and a SHA-256 (16 hex digits) of the state dict: tells whether the weights changed."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{data.numel()};".encode())
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().tobytes())
    count = sum(p.numel() for p in module.parameters())
    return {"parameters": int(count), "state_dict_sha256": digest.hexdigest()[:16]}


def _images_setting(result: Any) -> dict[str, Any]:
    source = dict(result.image_source or {})
    ids = "\n".join(result.image_ids or []) + "\n|" + "\n".join(result.rejected_images or [])
    return {"kind": source.get("kind"), "seed": source.get("seed"),
            "ids_sha256": hashlib.sha256(ids.encode()).hexdigest()[:16]}


def settings_of(result: Any, bootstrap: int, confidence: float) -> dict[str, Any]:
    """The settings that decide an ERF's numbers (see the module docstring)."""
    weights = dict(result.weights or {})
    engine = (result.timing or {}).get("engine") or {}
    return {
        "model": result.model, "target": result.target, "protocol": result.protocol,
        "input_size": list(result.input_size), "num_images": int(result.num_images),
        "images": _images_setting(result), "seed": result.seed,
        # a checkpoint by its file name: a snapshot must not depend on where a machine keeps the file
        "weights": {k: weights.get(k) for k in ("source", "init_mode", "tag", "seed")}
                   | {"path": Path(weights["path"]).name if weights.get("path") else None},
        "precision": engine.get("precision", "fp32"),
        "options": {k: v for k, v in (result.options or {}).items() if k != "input_size"},  # input_size: above
        "analysis": {"bootstrap": int(bootstrap or 0), "confidence": float(confidence)},
    }


def snapshot_of(result: Any, report: Any, *, bootstrap: int, confidence: float = 0.95,
                fields: Iterable[str] | None = None, weights: Mapping[str, Any] | None = None,
                test: str | None = None, images_digest: str | None = None) -> Snapshot:
    """The snapshot of an analysed result (``report`` an :class:`~erf_tools.AGDReport` or its dict;
    ``images_digest`` the :func:`tensor_digest` of a tensor of inputs)."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    extra = centre_intervals(result, n_resamples=bootstrap, confidence=confidence,
                             seed=(data.get("options") or {}).get("seed", 0))
    engine = (result.timing or {}).get("engine") or {}
    info = {"device": engine.get("device"), "map_shape": list(np.shape(result.map))}
    if data.get("noise_model") is not None:
        info["noise_model"] = data["noise_model"]
    settings = settings_of(result, bootstrap, confidence)
    if images_digest is not None:
        settings["images"]["tensor_sha256"] = images_digest
    return Snapshot(settings=settings,
                    fields=report_fields(data, fields=fields, extra_intervals=extra),
                    flags=tuple(data.get("flags") or ()),
                    map=reduced_map(result.map), versions=dict(result.versions or {}), weights=dict(weights or {}),
                    info=info, test=test)


def tensor_digest(images: Any) -> str:
    """SHA-256 (16 hex digits) of a tensor of input images: a tensor source is a setting by its content."""
    import torch

    data = images.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{tuple(images.shape)}:{data.dtype};".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _measure(model: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any], str | None]:
    import warnings

    from erf_tools import measure_erf

    given = options.get("images", DEFAULT_MEASURE["images"])
    from_files = isinstance(given, (str, Path))
    # a tensor of inputs brings its own size and count
    defaults = {k: v for k, v in DEFAULT_MEASURE.items() if from_files or k not in ("input_size", "num_images")}
    options = {**defaults, **options}
    if "target" in options:
        options["targets"] = options.pop("target")
    if isinstance(options.get("targets"), (list, tuple)):
        raise ValueError("a check compares one ERF: give a single target (one check per target)")
    options.setdefault("batch_size", options.get("num_images") or DEFAULT_MEASURE["num_images"])
    weights = {}
    if not isinstance(model, str):
        if options.get("weights") is not None:
            raise ValueError("weights= applies to a model given by name; load weights into the module yourself")
        weights = weights_digest(model)
    images = options.pop("images")
    with warnings.catch_warnings():
        # random-init warnings are the user's business in a regression test: the snapshot records the weights
        warnings.simplefilter("ignore", category=UserWarning)
        result = measure_erf(model, images, **options)
    return result, weights, None if from_files else tensor_digest(images)


def capture(model_or_result: Any, *, bootstrap: int = DEFAULT_BOOTSTRAP, confidence: float = 0.95,
            fields: Iterable[str] | None = None, test: str | None = None, **measure_options: Any) -> Capture:
    """Measure ``model_or_result`` (an ``nn.Module`` or a registered name; ``measure_options`` go to
    :func:`erf_tools.measure_erf` over :data:`DEFAULT_MEASURE`) or take it (an :class:`~erf_tools.ERFResult`),
    analyse it with ``bootstrap`` resamples and build its snapshot."""
    from erf_tools.analysis import analyze

    if bootstrap is None or int(bootstrap) < 0:
        raise ValueError(f"bootstrap must be a number of resamples >= 0, got {bootstrap!r}")
    if hasattr(model_or_result, "map") and hasattr(model_or_result, "per_image_maps"):
        if measure_options:
            raise ValueError(f"measure options {sorted(measure_options)} were given with a measured ERFResult: "
                             "pass the model instead, or measure it with those options yourself")
        result, weights, digest = model_or_result, {}, None
    else:
        result, weights, digest = _measure(model_or_result, dict(measure_options))
    seed = int(result.seed if result.seed is not None else 0)
    report = analyze(result, bootstrap=int(bootstrap), confidence=confidence, seed=seed)
    snapshot = snapshot_of(result, report, bootstrap=int(bootstrap), confidence=confidence, fields=fields,
                           weights=weights, test=test, images_digest=digest)
    return Capture(result=result, report=report, snapshot=snapshot)
