"""Which feature map an ERF is taken of, and how to capture it from one forward pass.

A target is a dotted module name whose output is the feature map. Accepted forms:

* ``None``: the family's documented ERF layer: ``model.erf_target`` for erf-tools models; ``norm`` (tokens, prefix
  tokens removed) for timm ViT-style models, as OpenERF; otherwise the last stage of timm's ``feature_info``
  (``layer4`` for ResNets, ``stages.3`` for ConvNeXt);
* ``"stage:N"`` (or ``"stageN"``, negative N counts from the end): stage N of ``feature_info``, stem excluded;
* any dotted module name (``"layer3.5"``), or an ``nn.Module`` inside the model.

Token outputs are turned into an NCHW grid: NLC sequences lose their prefix (class/register) tokens and are folded
into h×w using the input's aspect ratio; NHWC maps (timm Swin, ``output_fmt == "NHWC"``) are permuted.
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from erf_tools.layers.helpers import is_out_of_memory


class TargetError(ValueError):
    """A target cannot be resolved, or its output is not a spatial feature map."""


@dataclass(frozen=True)
class Target:
    """A resolved target: the name the user gave and the module it points to."""

    name: str
    module_name: str
    layout: str = "auto"  # "auto", "NCHW", "NHWC" or "NLC"
    reduction: int | None = None  # total stride from timm feature_info, when the model declares it


def default_target(model: nn.Module) -> str:
    """The documented ERF layer of ``model`` (see the module docstring)."""
    explicit = getattr(model, "erf_target", None)
    if explicit:
        return explicit
    modules = dict(model.named_modules())
    if getattr(model, "num_prefix_tokens", None) is not None and "norm" in modules:
        return "norm"
    info = _feature_modules(model)
    if info:
        return info[-1]
    raise TargetError(
        f"{type(model).__name__} declares no ERF layer (no erf_target, no timm feature_info): pass targets= "
        "with a module name, e.g. one of " + ", ".join(list(modules)[-5:])
    )


def _feature_entries(model: nn.Module) -> list[dict]:
    """The timm ``feature_info`` entries of ``model`` as dicts (empty without)."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    return [entry for entry in entries if isinstance(entry, dict) and entry.get("module")]


def _feature_modules(model: nn.Module) -> list[str]:
    """Module names of the model's stages: timm ``feature_info`` entries without the stem (reduction < 4), so
    ResNet's stages 0..3 are ``layer1``..``layer4`` like ConvNeXt's ``stages.0``..``stages.3``."""
    return [entry["module"] for entry in _feature_entries(model) if entry.get("reduction", 4) >= 4]


def resolve_targets(
    model: nn.Module, targets: str | nn.Module | Sequence[str | nn.Module] | None
) -> list[Target]:
    """Resolve the ``targets`` argument of :func:`erf_tools.measure_erf` to module names of ``model``."""
    if targets is None:
        requested: list = [None]
    elif isinstance(targets, (str, nn.Module)):
        requested = [targets]
    else:
        requested = list(targets)
        if not requested:
            raise TargetError("targets is an empty list")
    modules = dict(model.named_modules())
    by_identity = {id(m): name for name, m in modules.items()}
    resolved = []
    for item in requested:
        if item is None:
            resolved.append(Target(name=default_target(model), module_name=default_target(model)))
        elif isinstance(item, nn.Module):
            if id(item) not in by_identity:
                raise TargetError(f"the module {type(item).__name__} given as target is not part of the model")
            resolved.append(Target(name=by_identity[id(item)], module_name=by_identity[id(item)]))
        else:
            resolved.append(Target(name=item, module_name=_module_name(model, item, modules)))
    reductions = feature_reductions(model)
    resolved = [Target(t.name, t.module_name, t.layout, reductions.get(t.module_name)) for t in resolved]
    names = [t.module_name for t in resolved]
    if len(set(names)) != len(names):
        raise TargetError(f"the same target appears twice in {names}")
    return resolved


def feature_reductions(model: nn.Module) -> dict[str, int]:
    """Total stride of every timm ``feature_info`` entry, by module name, in network order (empty without)."""
    return {e["module"]: int(e["reduction"]) for e in _feature_entries(model) if "reduction" in e}


def _module_name(model: nn.Module, spec: str, modules: dict[str, nn.Module]) -> str:
    stage = re.fullmatch(r"stage:?(-?\d+)", spec.strip())
    if stage:
        stages = _feature_modules(model)
        index = int(stage.group(1))
        if not stages:
            raise TargetError(f"{type(model).__name__} has no feature_info, so {spec!r} cannot be resolved")
        if not -len(stages) <= index < len(stages):
            raise TargetError(f"{spec!r} is out of range: the model has stages 0..{len(stages) - 1} ({stages})")
        return stages[index]
    if spec in modules and spec != "":
        return spec
    close = difflib.get_close_matches(spec, [n for n in modules if n], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise TargetError(f"the model has no module named {spec!r}{hint}")


class _StopForward(Exception):
    """Raised by a capture hook once every target is captured, so the rest of the network (head) is skipped."""


class FeatureCapture:
    """Forward hooks that keep the first output of each target module; stops the forward after the last one.

    ``order`` lists the captured module names in execution order, and ``event_index`` the position in an external
    execution log (see :mod:`erf_tools.receptive_field`) at which each target was produced.
    """

    def __init__(self, model: nn.Module, targets: Sequence[Target], stop_early: bool = True) -> None:
        self.model = model
        self.targets = list(targets)
        self.outputs: dict[str, torch.Tensor] = {}
        self.stop_early = stop_early
        self.on_capture = None  # optional callback(module_name), e.g. to mark the RF log
        modules = dict(model.named_modules())
        self._handles = [
            modules[t.module_name].register_forward_hook(self._hook(t.module_name)) for t in self.targets
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if name in self.outputs:
                return
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(tensor, torch.Tensor):
                raise TargetError(f"target {name!r} returned {type(output).__name__}, not a tensor")
            self.outputs[name] = tensor
            if self.on_capture is not None:
                self.on_capture(name)
            if self.stop_early and len(self.outputs) == len(self.targets):
                raise _StopForward

        return hook

    def run(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = inputs.shape[-2:]
        for target in self.targets:
            if target.reduction is not None and min(height, width) < target.reduction:
                raise TargetError(
                    f"the {height}×{width} input is smaller than the total stride {target.reduction} of target "
                    f"{target.name!r}: use an input of at least {target.reduction} px (ideally several times more)"
                )
        self.outputs = {}
        try:
            self.model(inputs)
        except _StopForward:
            pass
        except (RuntimeError, ValueError, AssertionError) as exc:
            if is_out_of_memory(exc):
                raise  # the engine retries smaller batches
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TargetError(
                f"{type(self.model).__name__} failed on a {height}×{width} input before reaching the target(s) "
                f"({type(exc).__name__}: {first_line}); check the input size the model accepts"
            ) from exc
        missing = [t.module_name for t in self.targets if t.module_name not in self.outputs]
        if missing:
            raise TargetError(f"the forward pass never ran the target module(s) {missing}")
        return self.outputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_nchw(
    output: torch.Tensor, model: nn.Module, input_hw: tuple[int, int], layout: str = "auto", name: str = "target"
) -> torch.Tensor:
    """A target's output as an N×C×h×w grid (tokens folded, NHWC permuted); errors on non-spatial outputs."""
    if layout == "auto":
        if output.dim() == 3:
            layout = "NLC"
        elif output.dim() == 4:
            layout = "NHWC" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "NCHW"
        else:
            raise TargetError(
                f"target {name!r} has no spatial feature map: its output has shape {tuple(output.shape)} "
                "(pooled or flattened); choose an earlier layer"
            )
    if layout == "NCHW":
        return output
    if layout == "NHWC":
        return output.permute(0, 3, 1, 2)
    if layout != "NLC":
        raise TargetError(f"unknown layout {layout!r} for target {name!r}")
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    tokens = output[:, prefix:, :]
    count = tokens.shape[1]
    height, width = _token_grid(count, input_hw, model)
    if height * width != count:
        raise TargetError(
            f"target {name!r} has {count} tokens after removing {prefix} prefix tokens, which do not form a grid "
            f"for a {input_hw[0]}×{input_hw[1]} input"
        )
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def _token_grid(count: int, input_hw: tuple[int, int], model: nn.Module) -> tuple[int, int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == count:
        return int(grid[0]), int(grid[1])
    height = max(1, round(math.sqrt(count * input_hw[0] / input_hw[1])))
    return height, count // height


def centre_unit(options_centre: str | tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """The output unit whose ERF is measured, under the protocol's centre rule."""
    if options_centre == "half":
        return height // 2, width // 2
    if options_centre == "upper_left":
        return (height - 1) // 2, (width - 1) // 2
    row, col = options_centre
    if not (0 <= row < height and 0 <= col < width):
        raise TargetError(f"centre unit {(row, col)} is outside the {height}×{width} feature map")
    return int(row), int(col)
