"""The ERF result: maps plus everything needed to interpret them, and its on-disk form (``.npz`` + ``.json``).

Files are written atomically (a temporary file in the same folder, flushed, then ``os.replace``), so an interrupted
write or a full disk leaves the previous file intact. The JSON carries a schema version; results written by a newer
schema are refused with a clear message instead of being misread.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import MISSING as _MISSING
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1


class ResultFileError(ValueError):
    """A result file is missing, truncated, corrupt, or from a newer schema."""


@dataclass
class ERFResult:
    """One effective receptive field: the accumulated map of one target layer over a set of images.

    ``map`` is the protocol's quantity (e.g. RepLKNet: mean over valid images of the ReLU'd, RGB-summed input
    gradient; Kim 2023: the same with RGB mean before the clamp, normalised to sum 1). ``per_image_maps`` holds the
    per-image maps after the protocol's per-image post-processing, block-summed by ``per_image_downsample`` (1 = full
    resolution), for bootstrap confidence intervals over images. ``map_standard_error`` (optional, H×W, the units of
    ``map``) is the standard error of each pixel of ``map``: √(per-pixel sample variance of the per-image maps / N),
    scaled like ``map`` by any final normalisation; ``num_independent_images`` counts the independent source images
    (None: equal to ``num_images``). Results without them (older files) load with None.
    """

    map: np.ndarray
    per_image_maps: np.ndarray | None
    per_image_downsample: int
    num_images: int
    num_rejected: int
    rejected_images: list[str]
    image_ids: list[str]
    target: str
    feature_shape: tuple[int, int, int]
    centre_unit: tuple[int, int]
    receptive_field_centre: tuple[float, float] | None
    total_stride: tuple[float, float]
    input_size: tuple[int, int]
    model: str
    protocol: str
    options: dict[str, Any]
    weights: dict[str, Any]
    image_source: dict[str, Any]
    preprocessing: dict[str, Any]
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    map_standard_error: np.ndarray | None = None
    num_independent_images: int | None = None

    def metadata(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready."""
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ARRAY_FIELDS}
        return json.loads(json.dumps(meta, default=_json_default))

    # Jupyter display (a thumbnail and what the map is); the rendering lives in erf_tools.display, imported here so
    # that loading results never needs matplotlib
    def _repr_html_(self) -> str:
        from erf_tools.display import result_html

        return result_html(self)

    def _repr_png_(self) -> bytes:
        from erf_tools.display import result_png

        return result_png(self)


_ARRAY_FIELDS = ("map", "per_image_maps", "map_standard_error")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in result metadata")


def result_paths(path: str | Path) -> tuple[Path, Path]:
    """``run/erf`` or ``run/erf.npz`` or ``run/erf.json`` -> (``run/erf.npz``, ``run/erf.json``)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path`` and move it into place atomically.

    The temporary file is created with mode 0o666, so the process umask gives it the permissions of any ordinary
    file (``tempfile.mkstemp`` would make it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary file beside {str(path)!r}")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_result(result: ERFResult, path: str | Path) -> tuple[Path, Path]:
    """Write ``<path>.npz`` (arrays) and ``<path>.json`` (metadata) atomically; return both paths."""
    npz_path, json_path = result_paths(path)
    arrays = {"map": np.asarray(result.map, dtype=np.float64)}
    if result.per_image_maps is not None:
        arrays["per_image_maps"] = np.asarray(result.per_image_maps, dtype=np.float32)
    if result.map_standard_error is not None:
        arrays["map_standard_error"] = np.asarray(result.map_standard_error, dtype=np.float64)
    atomic_write_bytes(npz_path, lambda f: np.savez_compressed(f, **arrays))
    text = json.dumps(result.metadata(), indent=2, default=_json_default).encode()
    atomic_write_bytes(json_path, lambda f: f.write(text))
    return npz_path, json_path


def load_result(path: str | Path) -> ERFResult:
    """Read a result written by :func:`save_result`; raise :class:`ResultFileError` naming what is wrong."""
    npz_path, json_path = result_paths(path)
    for p in (npz_path, json_path):
        if not p.is_file():
            raise ResultFileError(f"result file {str(p)!r} does not exist")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{str(json_path)!r} is not valid JSON (truncated or corrupt): {exc}") from exc
    if not isinstance(meta, dict):
        raise ResultFileError(f"{str(json_path)!r} does not hold an ERF result")
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise ResultFileError(f"{str(json_path)!r} has no schema_version: not an erf-tools result")
    if version > SCHEMA_VERSION:
        raise ResultFileError(
            f"{str(json_path)!r} was written by a newer erf-tools (schema {version}; this one reads up to "
            f"{SCHEMA_VERSION}): upgrade erf-tools to read it"
        )
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - zipfile/numpy raise several types on corrupt files
        raise ResultFileError(f"{str(npz_path)!r} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    if "map" not in arrays or arrays["map"].ndim != 2:
        raise ResultFileError(f"{str(npz_path)!r} holds no 2-D 'map' array")
    known = {f.name for f in fields(ERFResult)}
    missing = [f.name for f in fields(ERFResult) if f.name not in meta and f.name not in _ARRAY_FIELDS
               and f.default is _MISSING and f.default_factory is _MISSING]
    if missing:
        raise ResultFileError(f"{str(json_path)!r} lacks the fields {missing}")
    values = {k: v for k, v in meta.items() if k in known}
    for name in ("feature_shape", "centre_unit", "receptive_field_centre", "total_stride", "input_size"):
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    return ERFResult(map=arrays["map"], per_image_maps=arrays.get("per_image_maps"),
                     map_standard_error=arrays.get("map_standard_error"), **values)
