"""ERF protocols as data: every choice a published protocol makes is one field of :class:`ERFOptions`.

Presets:

* ``replknet`` (Ding et al. 2022, ``erf/visualize_erf.py``): S = Σ_c ReLU(F[c, h//2, w//2]); map = Σ_RGB ReLU(∂S/∂x);
  mean over valid images; no normalisation; 1024×1024 bicubic warp resize, ImageNet mean/std.
* ``kim2023`` (Kim et al. 2023 as implemented by OpenERF 0.6.1): a = mean_c F[c, h//2, w//2] (no ReLU);
  map = clamp(mean_RGB(∂a/∂x), min=0) per image; summed over images and normalised to sum 1; the model's own timm
  data config (resize, centre crop, interpolation, mean/std).
* ``luo2016`` (Luo et al. 2016): a one-hot gradient at the centre unit of every channel (objective Σ_c F[c, centre],
  no ReLU, so dS/dF is 1 at the centre unit of each selected channel and 0 elsewhere); the ERF is the gradient
  *magnitude*, |∂S/∂x| summed over RGB, averaged over images, no normalisation; 224×224 warp resize. Restrict the
  channel set with ``channels=(...)`` to follow one channel.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

CENTRE_RULES = ("half", "upper_left")
CHOICES: dict[str, tuple] = {
    "activation": ("relu", "none"),
    "channel_reduction": ("sum", "mean"),
    "gradient": ("relu", "abs", "signed"),
    "rgb_reduction": ("sum", "mean"),
    "image_reduction": ("mean", "sum"),
    "normalisation": ("none", "sum", "max"),
    "preprocessing": ("replknet", "timm", "model", "none"),
}


@dataclass(frozen=True)
class ERFOptions:
    """Every choice of an ERF protocol.

    centre: which output unit: ``"half"`` = (h//2, w//2) (RepLKNet, OpenERF; the lower-right of the central 2×2 for
        even maps), ``"upper_left"`` = ((h-1)//2, (w-1)//2) (Kim et al. BMVC for ViTs), or an explicit (i, j).
    activation: applied to the centre activations before the channel reduction (RepLKNet: ReLU).
    channel_reduction: ``sum`` (RepLKNet) or ``mean`` (Kim) over the selected channels.
    channels: restrict the objective to these channel indices (None = all).
    gradient: ``relu`` keeps positive input gradients, ``abs`` their magnitude, ``signed`` leaves them.
    rgb_reduction: ``sum`` or ``mean`` over the RGB input channels.
    sign_before_rgb: apply ``gradient`` to each RGB channel before reducing (RepLKNet), or to the reduced gradient
        (Kim: clamp(mean_RGB(G))).
    image_reduction: ``mean`` over valid images or ``sum``.
    normalisation: ``none``, ``sum`` (the map sums to 1) or ``max`` (the map's maximum is 1).
    preprocessing: ``replknet`` (bicubic warp to S×S, ImageNet mean/std), ``timm`` (the model's data config),
        ``model`` (the ``replknet`` warp with the model's own mean/std and interpolation), ``none`` (tensors are used
        as given).
    input_size: S for the warp resize / crop; None = the model's native size (timm data config).
    """

    centre: str | tuple[int, int] = "half"
    activation: str = "relu"
    channel_reduction: str = "sum"
    channels: tuple[int, ...] | None = None
    gradient: str = "relu"
    rgb_reduction: str = "sum"
    sign_before_rgb: bool = True
    image_reduction: str = "mean"
    normalisation: str = "none"
    preprocessing: str = "replknet"
    input_size: int | None = 1024

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"option {name}={value!r} is not one of {', '.join(map(repr, allowed))}")
        centre = self.centre
        if isinstance(centre, str):
            if centre not in CENTRE_RULES:
                raise ValueError(f"option centre={centre!r} must be 'half', 'upper_left' or a (row, column) pair")
        elif not (isinstance(centre, (tuple, list)) and len(centre) == 2 and all(isinstance(c, int) for c in centre)):
            raise ValueError(f"option centre={centre!r} must be 'half', 'upper_left' or a (row, column) pair")
        if self.input_size is not None and (not isinstance(self.input_size, int) or self.input_size < 1):
            raise ValueError(f"option input_size={self.input_size!r} must be a positive integer or None")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ERFOptions] = {
    "replknet": ERFOptions(),
    "kim2023": ERFOptions(
        activation="none",
        channel_reduction="mean",
        gradient="relu",
        rgb_reduction="mean",
        sign_before_rgb=False,
        image_reduction="sum",
        normalisation="sum",
        preprocessing="timm",
        input_size=None,
    ),
    "luo2016": ERFOptions(
        activation="none",
        channel_reduction="sum",
        gradient="abs",
        rgb_reduction="sum",
        sign_before_rgb=True,
        image_reduction="mean",
        normalisation="none",
        preprocessing="replknet",
        input_size=224,
    ),
}


def resolve_options(protocol: str = "replknet", **overrides: Any) -> ERFOptions:
    """The preset ``protocol`` with individual options overridden; unknown names are an error."""
    if protocol not in PRESETS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(ERFOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown ERF option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
    if "channels" in overrides and overrides["channels"] is not None:
        overrides["channels"] = tuple(int(c) for c in overrides["channels"])
    if isinstance(overrides.get("centre"), list):
        overrides["centre"] = tuple(overrides["centre"])
    return replace(PRESETS[protocol], **overrides)
