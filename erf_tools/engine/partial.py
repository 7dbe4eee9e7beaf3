"""Partial results: checkpoints of the accumulators during a run, and resuming from them.

A checkpoint holds the exact sums bucket by bucket, so a resumed run ends with the same bits as an uninterrupted one,
and a fingerprint of the settings, so that a checkpoint is never resumed with other settings.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erf_tools.engine.accumulate import ERFAccumulator
from erf_tools.protocols import ERFOptions
from erf_tools.results import atomic_write_bytes
from erf_tools.targets import Target

__all__ = ["fingerprint", "load_partial", "save_partial"]


def fingerprint(model_name: str, targets: Sequence[Target], options: ERFOptions, input_hw: Sequence[int],
                source_description: dict[str, Any], precision: str = "fp32") -> dict[str, Any]:
    """What a partial result must agree on to be resumed: model, targets, ERF options, input size, images, precision."""
    return {"model": model_name, "targets": [t.module_name for t in targets], "options": options.to_dict(),
            "input_size": list(input_hw), "source": source_description, "precision": precision}


def save_partial(path: Path, accumulators: dict[str, ERFAccumulator], processed: int,
                 settings_fingerprint: dict) -> None:
    """Checkpoint every accumulator and the number of images consumed, atomically (for ``resume=True``)."""
    arrays = {"processed": np.array(processed),
              "fingerprint": np.array(json.dumps(settings_fingerprint, sort_keys=True))}
    for index, accumulator in enumerate(accumulators.values()):
        arrays.update({f"t{index}.{k}": v for k, v in accumulator.state().items()})
    atomic_write_bytes(Path(path), lambda f: np.savez(f, **arrays))


def load_partial(path: Path, accumulators: dict[str, ERFAccumulator], settings_fingerprint: dict) -> int:
    """Restore accumulators from :func:`save_partial`; return how many images were already consumed."""
    with np.load(path, allow_pickle=False) as data:
        saved = json.loads(str(data["fingerprint"]))
        if saved != json.loads(json.dumps(settings_fingerprint, sort_keys=True)):
            raise ValueError(
                f"the partial result {str(path)!r} was made with other settings (model, targets, options, size, "
                "images or precision) and cannot be resumed; delete it or run without --resume"
            )
        for index, accumulator in enumerate(accumulators.values()):
            accumulator.load_state({k.split(".", 1)[1]: data[k] for k in data.files if k.startswith(f"t{index}.")})
        return int(data["processed"])
