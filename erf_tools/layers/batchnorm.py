"""BatchNorm folding: an eval-mode BatchNorm is a per-channel affine map, so ``bn(conv(x))`` is one convolution.

Used by RepLKNet-style re-parameterisation (kernels merged from checkpoints) and by the engine's exact fast path
(:func:`fold_batchnorm` on a private copy of a model), so that both use the same arithmetic.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["fold_batchnorm", "fuse_bn", "meta_forward", "parent_and_name"]


def fuse_bn(weight: torch.Tensor, bn: Mapping[str, torch.Tensor | None] | nn.BatchNorm2d, eps: float = 1e-5,
            conv_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it: ``W' = W·γ/std``, ``b' = β + (b − μ)·γ/std``.

    ``bn`` is the module or a mapping with ``weight``, ``bias`` (either may be None: no affine part),
    ``running_mean``, ``running_var`` (a checkpoint's entries), so the same math serves re-parameterisation from
    modules or from state dicts, and :func:`fold_batchnorm`. Exact only with running statistics (eval outputs).
    """
    if isinstance(bn, nn.BatchNorm2d):
        eps = bn.eps
        bn = {"weight": bn.weight, "bias": bn.bias, "running_mean": bn.running_mean, "running_var": bn.running_var}
    std = torch.sqrt(bn["running_var"] + eps)
    scale = bn["weight"] / std if bn["weight"] is not None else 1.0 / std
    bias = -bn["running_mean"] * scale
    if conv_bias is not None:
        bias = bias + conv_bias * scale
    if bn["bias"] is not None:
        bias = bn["bias"] + bias
    return weight * scale.reshape(-1, 1, 1, 1), bias


def parent_and_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding submodule ``name`` and the attribute under which it holds it."""
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def meta_forward(model: nn.Module, example: torch.Tensor) -> None:
    """One forward of ``model`` with meta parameters and input: module hooks fire, nothing is computed."""
    state = {name: torch.empty_like(t, device="meta") for name, t in
             list(model.named_parameters()) + list(model.named_buffers())}
    torch.func.functional_call(model, state, (torch.empty_like(example, device="meta"),), strict=False)


def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, exclude: Sequence[str] = ()) -> list[str]:
    """Fold every eval-mode ``BatchNorm2d`` into the ``Conv2d`` that feeds it, in place; return the folded BNs.

    Why: in eval mode BN is a per-channel affine map, so ``bn(conv(x))`` is one convolution with rescaled weights
    and a bias, and the ERF (an input gradient) is unchanged up to float rounding. On CPUs the BN forward and
    backward are memory-bound passes over every activation: ~10 % of a ResNet-50 ERF pass (``bench/RESULTS.md``).

    Safety: a pair is folded only if a probe forward (on the meta device, or on ``example`` if the model cannot run
    there) shows that the BN's input *is* the conv's output, that no other operator reads that output, and that
    each module runs once. Only exact ``nn.Conv2d``/``nn.BatchNorm2d`` types are folded (subclasses such as
    weight-standardised convs or BN+activation layers compute something else), and convs named in ``exclude``
    (targets: their output would change) are left alone. Folded BNs become ``nn.Identity`` under the same name.
    """
    from torch.nn.utils import parametrize
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    convs = {m: n for n, m in model.named_modules() if type(m) is nn.Conv2d and n not in exclude
             and not parametrize.is_parametrized(m)}
    norms = {m: n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d and m.running_mean is not None
             and m.running_var is not None}
    if not convs or not norms:
        return []
    produced: dict[int, nn.Module] = {}
    consumed: dict[nn.Module, int] = {}
    calls: dict[nn.Module, int] = {}
    uses: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # keeps probe tensors alive so that their ids are not reused

    def after_conv(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        produced[id(output)] = module
        alive.append(output)

    def before_norm(module, args):
        calls[module] = calls.get(module, 0) + 1
        consumed[module] = id(args[0])
        alive.append(args[0])

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for value in tree_flatten((args, kwargs or {}))[0]:
                # only conv outputs (kept alive, so their ids are unique) are counted: a freed temporary's id
                # can be reused by a later tensor
                if isinstance(value, torch.Tensor) and id(value) in produced:
                    uses[id(value)] = uses.get(id(value), 0) + 1
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_hook(after_conv) for m in convs] + \
              [m.register_forward_pre_hook(before_norm) for m in norms]
    try:
        for attempt in ("meta", "real"):
            produced.clear(), consumed.clear(), calls.clear(), uses.clear(), alive.clear()
            try:
                with torch.no_grad(), CountReads():
                    if attempt == "meta":
                        meta_forward(model, example)
                    else:
                        model(example)
                break
            except Exception:  # noqa: BLE001 - models that create tensors on a fixed device cannot run on meta
                if attempt == "real":
                    raise
    finally:
        for handle in handles:
            handle.remove()
    folded = []
    for norm, name in norms.items():
        conv = produced.get(consumed.get(norm, -1))
        if conv is None or calls.get(conv) != 1 or calls.get(norm) != 1 or uses.get(consumed[norm]) != 1:
            continue
        if conv.out_channels != norm.num_features:
            continue
        with torch.no_grad():
            double = {k: None if v is None else v.double() for k, v in (
                ("weight", norm.weight), ("bias", norm.bias), ("running_mean", norm.running_mean),
                ("running_var", norm.running_var))}
            weight, bias = fuse_bn(conv.weight.double(), double, norm.eps,
                                   None if conv.bias is None else conv.bias.double())
            conv.weight.data = weight.to(conv.weight.dtype).contiguous()
            if conv.bias is None:
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            else:
                conv.bias.data = bias.to(conv.bias.dtype)
        parent, child = parent_and_name(model, name)
        setattr(parent, child, nn.Identity())
        folded.append(name)
    return folded
