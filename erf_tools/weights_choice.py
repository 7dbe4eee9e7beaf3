"""Which weights a measurement uses when none are named, and how every figure and table names them.

:func:`default_weights` never leaves a random network unlabelled: trained weights when they are on disk (or
downloadable right now, within a short bounded wait), otherwise the all-branches-active architecture probe
(``active``). Random init is never the default, because several families silence their residual branches at init
(see :mod:`erf_tools.weights`); it stays available as ``weights="random"``. :func:`weights_label` turns a result's
``weights`` record into the short label drawn on every panel and table row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erf_tools.pretrained import (CONNECT_TIMEOUT, WeightsUnavailableError, download, find_cached,
                                  no_checkpoint_note, offline_reason, pretrained_sources)


@dataclass(frozen=True)
class WeightsDecision:
    """The default weights of a model: the spec to load (``pretrained:TAG`` or ``active``), its kind and why."""

    weights: str
    kind: str  # "trained" or "probe"
    sentence: str
    path: Path | None = None


def default_weights(model: str, *, download_missing: bool = True, connect_timeout: float = CONNECT_TIMEOUT,
                    progress: bool = True) -> WeightsDecision:
    """Trained weights on disk, else (``download_missing``) downloaded when the host answers within
    ``connect_timeout`` seconds, else the architecture probe ``active``; with a sentence saying which and why."""
    architecture = model.split(".", 1)[0]
    sources = pretrained_sources(architecture)
    for source in sources:
        path = find_cached(source)
        if path is not None:
            return WeightsDecision(f"pretrained:{source.tag}", "trained",
                                   f"trained weights {source.name} found on disk ({path.name})", path)
    probe = "the architecture probe (weights active: all branches live, seeded; not a trained network)"
    downloadable = [s for s in sources if s.downloadable]
    if not sources:
        return WeightsDecision("active", "probe", f"{no_checkpoint_note(architecture)}: using {probe}")
    if not downloadable:
        return WeightsDecision("active", "probe", (
            f"{sources[0].name} ({sources[0].filename or 'no file name'}) is not on disk and cannot be downloaded "
            f"automatically (published at {sources[0].published_at()}): using {probe}; pass --weights PATH once "
            "you have the file"))
    source = downloadable[0]
    reason = offline_reason() if download_missing else "downloads were not allowed"
    if reason is None:
        try:
            path = download(source, progress=progress, connect_timeout=connect_timeout)
        except WeightsUnavailableError as exc:
            reason = exc.reason
        else:
            return WeightsDecision(f"pretrained:{source.tag}", "trained",
                                   f"trained weights {source.name} downloaded ({path.name})", path)
    return WeightsDecision("active", "probe", (
        f"{source.name} ({source.filename}) is not on disk and was not downloaded ({reason}): using {probe}; "
        "--weights pretrained fetches it when online"))


def weights_label(weights: dict[str, Any] | None) -> str:
    """A short label of a result's ``weights`` record, for panel titles and table rows.

    ``trained (uniconvnet_t_1k_224_ema.pth)``, ``architecture probe (active init, seed 0)``, ``random init (seed
    0)``, ``module as given``.
    """
    weights = weights or {}
    source = weights.get("source")
    seed = weights.get("seed")
    seeded = f", seed {seed}" if seed is not None else ""
    if source == "active":
        return f"architecture probe (active init{seeded})"
    if source == "random":
        return "random init" + (" (silenced branches)" if weights.get("silenced_branches") else "")
    if source in ("checkpoint", "pretrained", "timm-pretrained"):
        file = weights.get("file") or (Path(weights["path"]).name if weights.get("path") else None) or \
            weights.get("tag") or "checkpoint"
        converter = weights.get("converter")
        return f"trained ({file}{', converted from ' + converter if converter else ''})"
    if source == "module":
        return "module as given"
    return str(source or "unknown weights")
