"""Small helpers shared by the layers, the models and the engine."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["as_pair", "is_out_of_memory", "module_device"]


def as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``, ``(3,) -> (3, 3)``, ``(3, 5) -> (3, 5)``: the (height, width) form of a size, kernel, stride
    or padding (operators receive one-element lists for square ones)."""
    if isinstance(value, int):
        return value, value
    value = list(value)
    return (int(value[0]), int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module without tensors)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of any device (CUDA raises ``OutOfMemoryError``, CPUs and other
    backends a ``RuntimeError`` that says so)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
