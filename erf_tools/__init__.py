"""erf-tools: effective receptive field extraction, Gaussian (AGD) analysis and comparison figures.

The data flow: images (:mod:`erf_tools.images`) -> model + target layer (:mod:`erf_tools.models`,
:mod:`erf_tools.weights`, :mod:`erf_tools.targets`) -> ERF maps (:mod:`erf_tools.engine`, :func:`measure_erf`) ->
analysis (:mod:`erf_tools.analysis`, :func:`analyze`) -> results (:mod:`erf_tools.results`) and figures
(:mod:`erf_tools.plotting`) -> command line (:mod:`erf_tools.cli`). ``docs/architecture.md`` draws it module by module.

Imports are lazy (PEP 562): ``import erf_tools.analysis`` loads NumPy and SciPy only, never torch. The model families
register with timm as soon as timm is imported (or right away if it already is), so
``import erf_tools; timm.create_model("uniconvnet_t")`` works in either import order.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "AGDReport": "erf_tools.analysis", "analyze": "erf_tools.analysis",
    "measure_erf": "erf_tools.engine.measure", "MeasureConfig": "erf_tools.engine.measure",
    "PRESETS": "erf_tools.protocols", "ERFOptions": "erf_tools.protocols", "resolve_options": "erf_tools.protocols",
    "ERFResult": "erf_tools.results", "load_result": "erf_tools.results", "save_result": "erf_tools.results",
    "activate_branches": "erf_tools.weights", "load_checkpoint": "erf_tools.weights",
    "load_model": "erf_tools.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'erf_tools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Imports :mod:`erf_tools.models` (which registers the families) right after ``timm`` itself is imported.

    Why: registering at ``import erf_tools`` would load torch and timm for every user of the pure-NumPy analysis;
    waiting for the first model request would break ``timm.create_model("uniconvnet_t")`` after ``import
    erf_tools``. The finder only wraps timm's own loader and removes itself once it has run.
    """

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):  # noqa: ANN001
            exec_module(module)
            importlib.import_module("erf_tools.models")

        loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    importlib.import_module("erf_tools.models")
elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
