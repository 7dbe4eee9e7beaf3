"""erf-tools: effective receptive field extraction, Gaussian (AGD) analysis and comparison figures.

The data flow: images (:mod:`erf_tools.images`) -> model + target layer (:mod:`erf_tools.models`,
:mod:`erf_tools.weights`, :mod:`erf_tools.targets`) -> ERF maps (:func:`measure_erf`) -> analysis
(:func:`analyze`) -> results (:mod:`erf_tools.results`) and figures (:mod:`erf_tools.plotting`).
"""
__version__ = "0.1.0"

from erf_tools import models  # noqa: F401,E402  (registers uniconvnet_*, replknet_*, parc_*, conv2former_*, slak_*, unireplknet_* with timm)
from erf_tools.analysis import AGDReport, analyze  # noqa: E402
from erf_tools.extract import measure_erf  # noqa: E402
from erf_tools.protocols import PRESETS, ERFOptions, resolve_options  # noqa: E402
from erf_tools.results import ERFResult, load_result, save_result  # noqa: E402
from erf_tools.weights import activate_branches, load_checkpoint, load_model  # noqa: E402

__all__ = [
    "AGDReport", "analyze", "ERFOptions", "ERFResult", "PRESETS", "activate_branches", "load_checkpoint", "load_model", "load_result",
    "measure_erf", "resolve_options", "save_result",
]
