"""``precision="bf16"``: a float32 forward whose convolutions and linear layers make their input gradients in bf16.

Why not bf16 autocast (the policy before issue 18 item 4): the map moves with the *forward's* rounding, not the
backward's. resnet50 (active init) @224, Kim et al. protocol, 32 images, layer4, Pearson to the fp32 map
(``bench/RESULTS.md``, section bf16, ``bench/bench_bf16.py``):

* autocast everywhere 0.99461; with the stem, then the stages up to stride 4, 8, 16 in float32: 0.99768, 0.99836,
  0.99918 (stride ≤ 8 was the engine's rule), 0.99985;
* in float32, rounding only the weights of layer3/4 to bf16 gives 0.99957, the weights and the activations
  entering and leaving their convolutions 0.99927 (≈ autocast there), the weights of every stage 0.99856, while
  rounding every gradient entering and leaving those convolutions in the backward pass gives 1.00000.

A bf16 forward is a slightly different network: the rounded weights and activations move the ReLU/GELU switch
points, and the ERF, a derivative, follows them. The backward pass, given the forward, is linear in the gradient,
and bf16 rounding there (8 bits per product, float32 accumulation) averages out over the map. So this policy runs
the forward exactly as fp32 does and moves only the backward's matrix products to bf16: Pearson 0.99999 (max
|Δ|/max 2e-3) on that case, and ≥ 0.9998 on probe weights of every family and on the trained
EfficientNet-Lite1, where the stride ≤ 8 autocast rule gave 0.097 (UniRepLKNet) to 0.9988. The gain is at most
the backward's share of the time: it is the whole gain where the backward's convolutions dominate (ResNets);
families whose forward dominates on a CPU (large-kernel depthwise convolutions, MLP blocks) gain little or nothing.

What is covered: :func:`torch.nn.functional.conv2d` (numeric or symmetric ``"same"``/``"valid"`` padding) and
:func:`torch.nn.functional.linear` with float32 inputs that require a gradient and weights that do not (the engine
freezes parameters); every other operator, and these ones otherwise, run and differentiate in float32 as usual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

__all__ = ["Bf16InputGradients"]


class _Conv2dBf16InputGradient(torch.autograd.Function):
    """conv2d in float32; its input gradient from bf16 copies of the incoming gradient and the weight (float32
    accumulation in the kernels). Saves the weight only: the input is not needed for the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gradient):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        grad_input = conv2d_input(shape, weight.bfloat16(), gradient.bfloat16(), stride, padding, dilation, groups)
        return grad_input.float(), None, None, None, None, None, None


class _LinearBf16InputGradient(torch.autograd.Function):
    """linear in float32; its input gradient ``gradient @ weight`` in bf16, as one matrix product over the flattened
    leading dimensions (a batched product of a channels-last map would copy the weight per image)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gradient):
        (weight,) = ctx.saved_tensors
        rows = gradient.to(torch.bfloat16, memory_format=torch.contiguous_format).view(-1, weight.shape[0])
        return (rows @ weight.bfloat16()).float().view(*gradient.shape[:-1], weight.shape[1]), None, None


def _numeric_padding(padding, weight: torch.Tensor, dilation) -> tuple[int, int] | None:
    """Padding as two integers; ``"same"`` only where it pads both sides equally; None where it does not."""
    if not isinstance(padding, str):
        return _pair(padding)
    if padding == "valid":
        return 0, 0
    reach = [d * (k - 1) for d, k in zip(_pair(dilation), weight.shape[-2:])]
    return None if any(r % 2 for r in reach) else (reach[0] // 2, reach[1] // 2)


def _conv2d_arguments(args, kwargs) -> list:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    return list(args) + [kwargs.get(name, default) for name, default
                         in zip(names[len(args):], (None, None, None, 1, 0, 1, 1)[len(args):])]


def _wants_bf16_gradient(x, weight) -> bool:
    return (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.requires_grad
            and isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and not weight.requires_grad
            and torch.is_grad_enabled())


class Bf16InputGradients(TorchFunctionMode):
    """For the duration of a forward: conv2d and linear calls whose input needs a gradient get a bf16 input
    gradient (see the module docstring); their forward, and everything else, is float32 as without it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, weight, bias, stride, padding, dilation, groups = _conv2d_arguments(args, kwargs)
            if _wants_bf16_gradient(x, weight) and x.dim() == 4:
                numeric = _numeric_padding(padding, weight, dilation)
                if numeric is not None:
                    return _Conv2dBf16InputGradient.apply(x, weight, bias, _pair(stride), numeric, _pair(dilation),
                                                          groups)
        elif func is F.linear:
            x, weight = args[0] if args else kwargs["input"], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _wants_bf16_gradient(x, weight):
                return _LinearBf16InputGradient.apply(x, weight, bias)
        return func(*args, **kwargs)
