"""Where a model's weights come from: random init, the all-branches-active probe init, local checkpoints, timm tags.

Random-init ERFs are only informative when every residual branch contributes. Several families silence their
branches at init (timm ``zero_init_last`` sets the last BN of each block to 0; ConvNeXt-style layer scales are 1e-6;
UniConvNet's DCN masks are exactly 0), so their random-init ERF is the stem/downsample path alone.
:func:`find_silenced_branches` detects that, and :func:`activate_branches` is the explicit "architecture probe"
init that makes every branch live. It is the randomisation used for the conformance fixtures:

* Conv / Linear weights ~ N(0, 1/fan_in) (fan_in = ``weight[0].numel()``), biases ~ N(0, 0.1²);
* BatchNorm / LayerNorm / GroupNorm weights ~ U(0.5, 1.5), biases ~ N(0, 0.1²);
  BN running_mean ~ N(0, 0.1²), running_var ~ U(0.5, 1.5);
* layer-scale vectors (``gamma``, ``gamma1``, ``gamma2``, ``layer_scale``, ``layer_scale_1``, ``layer_scale_2``,
  timm ``LayerScale.gamma``) ~ U(0.5, 1.5);
* then every module's own ``active_init_(generator)`` (DCN offset/mask, ParC position embedding), in module order.

All draws come from one ``torch.Generator`` seeded by ``seed``, in ``named_modules()`` order, so the result is
reproducible. It describes the architecture, not a trained network: label figures made with it as such.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from erf_tools.converters import ConversionError, alignment, convert_state_dict, recognised_layouts
from erf_tools.models.common import unwrap_checkpoint
from erf_tools.pretrained import WeightsUnavailableError, fetch  # noqa: F401  (re-exported for callers)

LAYER_SCALE_NAMES = ("gamma", "gamma1", "gamma2", "layer_scale", "layer_scale_1", "layer_scale_2")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
#: A layer scale whose largest entry is below this is treated as silencing its branch.
SILENT_SCALE = 1e-4


class RandomInitWarning(UserWarning):
    """The model runs with random weights whose residual branches are silenced."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, was refused, or does not match the model.

    ``details`` (when set) holds the full key lists of a mismatch, ``report_path`` the file they were written to.
    """

    details: str | None = None
    report_path: Path | None = None


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; stored in every result."""

    source: str  # "random", "active", "checkpoint", "pretrained", "module"
    init_mode: str  # "default", "active", "loaded" or "as given"
    path: str | None = None
    tag: str | None = None  # "<architecture>.<tag>" of a published checkpoint
    seed: int | None = None
    silenced_branches: list[str] = field(default_factory=list)
    file: str | None = None  # the checkpoint's file name
    layout: str | None = None  # "native", "<family> official" or a converter's name
    converter: str | None = None  # the converter applied (erf_tools.converters), None when none was needed
    published_at: str | None = None  # where a published checkpoint comes from
    decision: str | None = None  # why these weights, when they were chosen by default (erf_tools.weights_choice)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_layer_scale(module_name: str, param_name: str, module: nn.Module) -> bool:
    if param_name in LAYER_SCALE_NAMES:
        return True
    # timm's LayerScale / LayerScale2d modules keep their vector as ``gamma``; covered above. Some keep ``scale``.
    return type(module).__name__.startswith("LayerScale") and param_name in ("gamma", "scale", "weight")


def find_silenced_branches(model: nn.Module) -> list[str]:
    """Names of parameters that silence a residual branch: tiny layer scales, all-zero norm weights or DCN masks."""
    silenced = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            data = param.detach()
            if _is_layer_scale(module_name, param_name, module) and data.abs().max() < SILENT_SCALE:
                silenced.append(full)
            elif isinstance(module, _NORM_TYPES) and param_name == "weight" and not data.any():
                silenced.append(full)
        if hasattr(module, "silenced_parameters"):
            silenced.extend(f"{module_name}.{p}" for p in module.silenced_parameters())
    return silenced


def warn_if_silenced(model: nn.Module, model_name: str = "model") -> list[str]:
    """Warn loudly (once per call) when residual branches are silenced; return their names."""
    silenced = find_silenced_branches(model)
    if silenced:
        shown = ", ".join(silenced[:3]) + (f" and {len(silenced) - 3} more" if len(silenced) > 3 else "")
        warnings.warn(
            f"{model_name} runs with random weights and {len(silenced)} silenced residual-branch parameters "
            f"({shown}): its ERF shows only the stem/downsample path. Load trained weights, or use the "
            "all-branches-active init (weights='active') for an architecture-only comparison.",
            RandomInitWarning,
            stacklevel=2,
        )
    return silenced


@torch.no_grad()
def activate_branches(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter so that no residual branch is silenced (see the module docstring). In place."""
    generator = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=generator) * std)

    def uniform_(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    for _, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or type(module).__name__.startswith("LayerNorm")
        for name, param in module.named_parameters(recurse=False):
            if _is_layer_scale("", name, module):
                uniform_(param, 0.5, 1.5)
            elif is_norm and name == "weight":
                uniform_(param, 0.5, 1.5)
            elif name == "bias":
                normal_(param, 0.1)
            elif name == "weight" and param.dim() >= 2:
                normal_(param, 1.0 / math.sqrt(param[0].numel()))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            normal_(module.running_mean, 0.1)
            uniform_(module.running_var, 0.5, 1.5)
    # A second pass: a module's own rule (e.g. DCN offset/mask layers) must not be overwritten by the generic draws
    # that reach its children later in named_modules() order.
    for _, module in model.named_modules():
        if hasattr(module, "active_init_"):
            module.active_init_(generator)
    return model


_SAFE_PICKLE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "numpy.",
                         "argparse.Namespace")


def pickle_imports(path: Path) -> list[str] | None:
    """The ``module.name`` globals a pickle (plain, or inside torch's zip format) would import, read from its
    opcodes without executing anything; None when the file is not a readable pickle."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return None
                data = archive.read(names[0])
        else:
            data = Path(path).read_bytes()
        imported, strings = [], []
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                imported.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                imported.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str):
                strings.append(argument)
        return imported
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return None


def _classifier_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier", "head")
    return [names] if isinstance(names, str) else list(names)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The bare state dict of a local checkpoint file, read safely (``weights_only=True`` or safetensors).

    Unwraps official wrappers (``{'model': ...}``, ``{'state_dict': ...}``, EMA files, ``module.`` prefixes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc})") from exc
    try:
        # Official training scripts (RepLKNet, UniConvNet/ConvNeXt ``save_model``) store their ``args`` Namespace
        # beside the weights; it holds only data, so it is the one class allowed besides tensors and containers.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        imported = pickle_imports(path)
        unsafe = [name for name in imported or [] if not name.startswith(_SAFE_PICKLE_PREFIXES)]
        if unsafe:
            raise CheckpointError(
                f"refused to load {str(path)!r}: it is a pickle that carries code ({', '.join(unsafe[:3])}), and "
                "erf-tools only loads checkpoints with torch.load(weights_only=True)"
            ) from exc
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint (truncated, corrupt or another format: {message[:160]})"
        ) from exc
    try:
        state = unwrap_checkpoint(checkpoint)
    except TypeError as exc:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: {exc}") from exc
    if not state:
        raise CheckpointError(f"{str(path)!r} holds no tensors")
    return state


def prepare_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str,
                                                                                 str | None]:
    """Bring ``state`` into ``model``'s layout: a registered converter recognised from the keys
    (:mod:`erf_tools.converters`), then the family's ``checkpoint_filter_fn`` (official formats).

    Returns the state, the layout name (``native``, the converter's name, or ``<family> official``) and the
    converter's name (None when none was applied). Raises :class:`~erf_tools.converters.ConversionError` when a
    recognised layout does not fit the model.
    """
    converted, converter = convert_state_dict(state, model)
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    filtered = converted
    if filter_fn is not None:
        try:
            filtered = filter_fn(converted, model)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConversionError(f"the {module.__name__.rsplit('.', 1)[-1]} checkpoint filter refused it: {exc}"
                                  ) from exc
    if converter is not None:
        return filtered, converter.name, converter.name
    layout = "native" if set(filtered) == set(state) else f"{module.__name__.rsplit('.', 1)[-1]} official"
    return filtered, layout, None


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True) -> WeightsInfo:
    """Load a local checkpoint into ``model`` (safely, ``weights_only=True``); return where the weights came from.

    Unwraps official wrappers (:func:`read_state_dict`), converts foreign layouts recognised from their keys and
    applies the family's ``checkpoint_filter_fn`` (:func:`prepare_state_dict`), and resizes the classifier when
    the checkpoint has a different number of classes (ImageNet-22k heads): the ERF does not depend on the head.
    A mismatch raises :class:`CheckpointError` whose message says whether the shapes line up one-to-one (a naming
    mismatch); its ``details`` and the file ``report_path`` hold the full key lists.
    """
    path = Path(path)
    raw = read_state_dict(path)
    try:
        state, layout, converter = prepare_state_dict(raw, model)
    except ConversionError as exc:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {name}: {exc}") from exc

    own = model.state_dict()
    for head in _classifier_names(model):
        weight = state.get(f"{head}.weight")
        if (
            weight is not None
            and f"{head}.weight" in own
            and weight.shape != own[f"{head}.weight"].shape
            and hasattr(model, "reset_classifier")
        ):
            model.reset_classifier(weight.shape[0])
            own = model.state_dict()

    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or (strict and (missing or unexpected)):
        raise _mismatch_error(path, model, raw, own, missing, unexpected, mismatched)
    model.load_state_dict(state, strict=strict)
    return WeightsInfo(source="checkpoint", init_mode="loaded", path=str(path), file=path.name, layout=layout,
                       converter=converter)


#: Folder for the full key lists of refused checkpoints (a user's ``--debug`` aid).
KEY_REPORT_DIR = Path(tempfile.gettempdir()) / "erf-tools"


def _mismatch_error(path: Path, model: nn.Module, raw: dict, own: dict, missing: list, unexpected: list,
                    mismatched: list) -> CheckpointError:
    arch = type(model).__name__
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or arch

    def listing(title: str, items: list) -> str:
        if not items:
            return ""
        shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        return f"\n  {title}: {shown}"

    lined_up = alignment(raw, own)
    layouts = recognised_layouts(raw)
    hint = (f"\n  recognised layout {', '.join(c.name for c in layouts)} (for {', '.join(c.target for c in layouts)}),"
            f" but not for {name}" if layouts else "")
    details = "\n".join(
        [f"checkpoint {path} vs model {name} ({arch})", "", f"missing keys ({len(missing)}):", *missing, "",
         f"unexpected keys ({len(unexpected)}):", *unexpected, "", f"shape mismatches ({len(mismatched)}):",
         *mismatched, "", f"checkpoint tensors in order ({len(raw)}):",
         *(f"{k} {tuple(v.shape)}" for k, v in raw.items()), "", f"model tensors in order ({len(own)}):",
         *(f"{k} {tuple(v.shape)}" for k, v in own.items())]) + "\n"
    report = KEY_REPORT_DIR / f"{path.stem}.{name}.keys.txt"
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(details)
        where = f"full key lists in {report} (or rerun with --debug)"
    except OSError:
        report, where = None, "rerun with --debug for the full key lists"
    message = (
        f"checkpoint {str(path)!r} does not match the {arch} architecture ({name})"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", mismatched)
        + f"\n  {lined_up.sentence()}"
        + hint
        + ("\n  register a converter for this layout (erf_tools.converters.register_converter; README "
           "'Trained weights') or rename the keys" if lined_up.aligned_in_order or lined_up.same_shapes else "")
        + f"\n  {where}"
    )
    error = CheckpointError(message)
    error.details, error.report_path = details, report
    return error


class UnknownModelError(ValueError):
    """No registered model has that name."""


def model_names() -> list[str]:
    """Every model name ``load_model`` accepts (timm's registry, including erf-tools' families)."""
    import timm

    import erf_tools.models  # noqa: F401  (registers the project's families)

    return timm.list_models()


#: Weight specifications besides a checkpoint path (``pretrained:TAG`` and ``timm:TAG`` name a tag).
WEIGHT_SPECS = ("default", "random", "active", "pretrained", "pretrained:TAG", "timm", "timm:TAG", "PATH")


def parse_pretrained_spec(weights: str) -> tuple[bool, str | None]:
    """(is a published-checkpoint spec, its tag): ``pretrained``, ``pretrained:TAG``, and timm's older spelling
    ``timm`` / ``timm:TAG``."""
    head, sep, tag = weights.partition(":")
    if head in ("pretrained", "timm") and (sep == "" or tag):
        return True, tag or None
    return False, None


def load_model(
    name: str, weights: str = "random", *, seed: int = 0, num_classes: int | None = None, progress: bool = True
) -> tuple[nn.Module, WeightsInfo]:
    """Build a registered model and its weights.

    weights: ``"random"`` (the family's default init; warned about when branches are silenced), ``"active"``
    (:func:`activate_branches` with ``seed``), a local checkpoint path, ``"pretrained"`` / ``"pretrained:<tag>"``
    (the published checkpoint declared in the model's pretrained configs, from the cache or downloaded with a
    progress bar; offline it fails within seconds saying where to get the file; ``"timm"`` / ``"timm:<tag>"`` are
    the same), or ``"default"`` (:func:`erf_tools.weights_choice.default_weights`: trained weights when on disk or
    quickly downloadable, else the ``active`` probe).
    """
    import difflib

    import timm

    architecture = name.split(".", 1)[0]
    names = model_names()
    if architecture not in names:
        close = difflib.get_close_matches(architecture, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `erf models` lists the registered models"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    decision = None
    if weights == "default":
        from erf_tools.weights_choice import default_weights

        decision = default_weights(architecture)
        weights = decision.weights
    if weights in ("random", "active"):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights == "active":
            activate_branches(model, seed=seed)
            info = WeightsInfo(source="active", init_mode="active", seed=seed)
        else:
            info = WeightsInfo(source="random", init_mode="default", seed=seed,
                               silenced_branches=find_silenced_branches(model))
        return model.eval(), _with_decision(info, decision)
    is_pretrained, tag = parse_pretrained_spec(weights)
    if is_pretrained:
        source, path = fetch(name, tag, progress=progress)
        torch.manual_seed(seed)
        # built under its tag, so that model.pretrained_cfg (mean/std, input size) is that checkpoint's own
        model = timm.create_model(source.name, pretrained=False, **kwargs)
        loaded = load_checkpoint(model, path)
        info = WeightsInfo(source="pretrained", init_mode="loaded", path=str(path), tag=source.name,
                           file=source.filename or path.name, layout=loaded.layout, converter=loaded.converter,
                           published_at=source.published_at())
        return model.eval(), _with_decision(info, decision)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    info = load_checkpoint(model, weights)
    return model.eval(), info


def _with_decision(info: WeightsInfo, decision) -> WeightsInfo:
    if decision is None:
        return info
    from dataclasses import replace

    return replace(info, decision=decision.sentence)
