"""Pieces shared by every model family: checkpoint unwrapping and the conventions the engine relies on.

Conventions for model classes in this package (the engine reads them; timm models fall back to ``feature_info``):

* ``erf_target: str``: dotted module name of the family's documented ERF layer (the last stage's spatial output
  before pooling, norm and head). ``measure_erf`` uses it when no target is given.
* ``feature_info``: timm-style list of ``{"num_chs", "reduction", "module"}`` dicts, one per stage, so
  ``target="stage:2"`` resolves to a module name.
* A module may define ``active_init_(generator)``; :func:`erf_tools.weights.activate_branches` calls it after the
  generic rules, for parameters only that module understands (DCN offsets and masks, ParC position embeddings).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

#: Keys under which official training scripts wrap the weights, in the order they are tried.
CHECKPOINT_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")


def unwrap_checkpoint(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Return the bare state dict inside an official checkpoint.

    Handles ``{'model': ...}`` (UniConvNet, ConvNeXt-style training scripts), ``{'state_dict': ...}``,
    ``{'model_ema': ...}`` when it is the only weights entry, and the ``module.`` prefix of DDP checkpoints.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a mapping of tensors, got {type(checkpoint).__name__}")
    state = checkpoint
    for _ in range(3):  # wrappers can nest, e.g. {'model': {'state_dict': ...}}
        if any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        for key in CHECKPOINT_WRAPPER_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
        else:
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors
