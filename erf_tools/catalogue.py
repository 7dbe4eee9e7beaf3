"""The model catalogue: which models are registered, their families, parameters, ERF layers and checkpoint files,
and importing users' own model modules."""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MODEL_COLUMNS", "check_model_name", "import_modules", "models_table", "stage_targets"]


def check_model_name(model: str) -> None:
    """Raise :class:`~erf_tools.weights.UnknownModelError` (with the closest names) unless ``model`` is registered."""
    from erf_tools.weights import load_model, model_names

    if model.split(".", 1)[0] not in model_names():
        load_model(model)  # raises UnknownModelError naming the closest registered names


def stage_targets(model: str) -> list[str]:
    """``stage:0`` … ``stage:N-1`` for every stage of ``model`` (read from its timm ``feature_info`` on the meta
    device, so nothing is allocated)."""
    import timm
    import torch

    from erf_tools.targets import TargetError, resolve_targets

    check_model_name(model)
    with torch.device("meta"):
        module = timm.create_model(model, pretrained=False)
    found = []
    for index in range(16):
        try:
            resolve_targets(module, f"stage:{index}")
        except TargetError:
            break
        found.append(f"stage:{index}")
    if not found:
        raise ValueError(f"{model} declares no stages (no timm feature_info); give the targets by module name")
    return found


MODEL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "model", "text"),
    ("family", "family", "text"),
    ("params_m", "params (M)", "float1"),
    ("erf_layer", "default ERF layer", "text"),
    ("weights", "weights available (tag: file)", "text"),
    ("on_disk", "on disk", "text"),
)


def _family(name: str) -> str:
    import timm.models

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _is_own_model(name: str) -> bool:
    import timm.models

    return not timm.models.model_entrypoint(name).__module__.startswith("timm.")


def _weight_files(name: str) -> tuple[list[str], list[str]]:
    """``tag: file`` of every published checkpoint of ``name``, and the tags already on disk."""
    from erf_tools.pretrained import find_cached, pretrained_sources

    sources = pretrained_sources(name)
    return ([f"{s.tag}: {s.filename or '?'}" for s in sources],
            [s.tag for s in sources if find_cached(s) is not None])


def models_table(pattern: str | None = None, *, parameters: bool = True) -> list[dict[str, Any]]:
    """Registered models as rows: name, family, parameter count (millions), default ERF layer, weight files.

    Without ``pattern``, the models registered outside timm (erf-tools' families and any module imported with
    ``--import``); with a pattern (``"resnet*"``), the matching timm registry names. Parameters and the ERF layer
    are read from a model built on the meta device (no memory, no weights); ``parameters=False`` skips that.
    Weight files are the checkpoint file names of each pretrained tag (timm ``pretrained_cfg``); ``on_disk`` lists
    the tags already in the caches (``--weights pretrained:TAG`` downloads the others, see
    :mod:`erf_tools.pretrained`).
    """
    import timm
    import torch

    import erf_tools.models  # noqa: F401  (registers the project's families)
    from erf_tools.targets import TargetError, default_target

    names = timm.list_models(pattern) if pattern else [n for n in timm.list_models() if _is_own_model(n)]
    rows = []
    for name in names:
        files, on_disk = _weight_files(name)
        row: dict[str, Any] = {"name": name, "family": _family(name), "params_m": None, "erf_layer": None,
                               "weights": ", ".join(files) or "none (random / active init only)",
                               "on_disk": ", ".join(on_disk) or ("none" if files else "")}
        if parameters:
            try:
                with torch.device("meta"):
                    module = timm.create_model(name, pretrained=False)
                row["params_m"] = sum(p.numel() for p in module.parameters()) / 1e6
                try:
                    row["erf_layer"] = default_target(module)
                except TargetError:
                    row["erf_layer"] = "none declared (give --target)"
            except Exception as exc:  # noqa: BLE001 - a model that cannot be built on meta still gets listed
                row["erf_layer"] = f"not inspectable ({type(exc).__name__})"
        rows.append(row)
    return rows


def import_modules(modules: Iterable[str]) -> list[str]:
    """Import user modules (dotted names or ``.py`` paths) so that their ``@register_model`` functions run.

    Raises :class:`ImportError` with one sentence naming the module when it cannot be imported.
    """
    imported = []
    for spec in modules:
        path = Path(spec)
        try:
            if spec.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise ImportError(f"module file {spec!r} does not exist")
                name = "erf_user_" + re.sub(r"\W", "_", path.stem)
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code can raise anything at import time
            raise ImportError(f"importing {spec!r} failed: {type(exc).__name__}: {exc}") from exc
        imported.append(spec)
    return imported
