"""The ERF objective and the protocol's per-sample post-processing of input gradients.

The ERF of a target is the input gradient of Σ_b reduce_c(act(F[b, c, i, j])) at its centre unit (i, j). In eval
mode sample b's features depend on x_b alone, so one backward over a batch gives every per-sample gradient; the sign
rule and the RGB reduction are applied per sample, before anything is summed over images.
"""
from __future__ import annotations

import torch

from erf_tools.protocols import ERFOptions

__all__ = ["apply_sign", "centre_activations", "centre_objective", "objective_is_blind", "per_sample_maps"]


def centre_activations(features: torch.Tensor, unit: tuple[int, int],
                       options: ERFOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(B×C activations at the centre unit after the channel selection and activation, their per-sample reduction)."""
    centre = features[:, :, unit[0], unit[1]].float()
    if options.channels is not None:
        centre = centre[:, list(options.channels)]
    if options.activation == "relu":
        centre = torch.relu(centre)
    return centre, centre.sum(dim=1) if options.channel_reduction == "sum" else centre.mean(dim=1)


def centre_objective(features: torch.Tensor, unit: tuple[int, int], options: ERFOptions) -> torch.Tensor:
    """The scalar whose input gradient is the ERF: Σ_b reduce_c(act(F[b, c, i, j])) over the selected channels."""
    return centre_activations(features, unit, options)[1].sum()


def objective_is_blind(features: torch.Tensor, unit: tuple[int, int], options: ERFOptions,
                       relative: float = 1e-5) -> bool:
    """Whether the objective is zero for every sample up to float rounding while the features are not (e.g. the
    channel mean of a LayerNorm output with weight 1 and bias 0, identically 0 in exact arithmetic): its input
    gradient is then rounding noise, not an ERF."""
    with torch.no_grad():
        centre, per_sample = centre_activations(features, unit, options)
        scale = float(centre.abs().mean()) if centre.numel() else 0.0
        return scale > 0 and float(per_sample.abs().max()) <= relative * scale


def apply_sign(gradient: torch.Tensor, rule: str) -> torch.Tensor:
    """The protocol's sign rule: ``relu`` keeps positive parts, ``abs`` magnitudes, anything else the signed value."""
    if rule == "relu":
        return torch.relu(gradient)
    if rule == "abs":
        return gradient.abs()
    return gradient


def per_sample_maps(input_gradient: torch.Tensor, options: ERFOptions) -> torch.Tensor:
    """B×3×H×W input gradients -> B×H×W maps, with the sign rule applied per sample (before any image sum)."""
    reduce = torch.sum if options.rgb_reduction == "sum" else torch.mean
    if options.sign_before_rgb:
        return reduce(apply_sign(input_gradient, options.gradient), dim=1)
    return apply_sign(reduce(input_gradient, dim=1), options.gradient)
