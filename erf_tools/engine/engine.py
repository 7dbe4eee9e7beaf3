"""The batch computation: one forward per batch, one input gradient per target, per-sample maps; the precision policy.

Batching is exact: in eval mode sample b's features depend on x_b alone, so ∂(Σ_b s_b)/∂x_b = ∂s_b/∂x_b. The
protocol's per-sample post-processing (:mod:`.objective`) happens before anything is summed over images.
"""
from __future__ import annotations

import contextlib
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from erf_tools.engine.bf16_backward import Bf16InputGradients
from erf_tools.engine.objective import centre_objective, objective_is_blind, per_sample_maps
from erf_tools.engine.windows import InputWindow, OperatorLog, plan_windows, same_gradient
from erf_tools.layers.helpers import is_out_of_memory
from erf_tools.receptive_field import LayerLog, path_geometry, unit_centre
from erf_tools.targets import FeatureCapture, Target, centre_unit, feature_reductions, to_nchw

__all__ = ["FP32_MAX_STRIDE", "PRECISIONS", "ERFEngine", "TargetGeometry", "frozen_eval"]

PRECISIONS = ("fp32", "bf16", "fp16")
#: under fp16, the stem and the stages up to this total stride run in float32 (accuracy of the maps); bf16 runs the
#: whole forward in float32 (:mod:`erf_tools.engine.bf16_backward`)
FP32_MAX_STRIDE = 8


@dataclass
class TargetGeometry:
    """Where a target's centre unit is: its feature shape, index, receptive-field centre and total stride (input px)."""

    target: Target
    feature_shape: tuple[int, int, int]
    unit: tuple[int, int]
    rf_centre: tuple[float, float] | None
    stride: tuple[float, float]


@contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode without parameter gradients for the duration; the caller's state is restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class ERFEngine:
    """Holds what stays fixed during one measurement; :meth:`process` turns one batch into per-sample maps.

    One forward pass per batch captures every target; one backward per target (the graph is kept between them)
    gives the per-sample input gradients. No parameter gradients are computed (the model is used under
    :func:`frozen_eval`). The first batch also measures each target's geometry (centre unit, receptive-field centre,
    total stride) and, for early targets, tries input windows (:mod:`erf_tools.engine.windows`).
    """

    def __init__(self, model, targets, options, device, precision, channels_last, crop_early_targets=True,
                 diagnose=True, batched_vjp=False):
        self.model = model
        self.targets = targets
        self.options = options
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.crop_early_targets = crop_early_targets
        #: check the first batch for blind objectives (off for shape-only replays: meta and fake tensors hold no data)
        self.diagnose = diagnose
        #: the input gradients of all full-input targets as one vmapped backward (see :meth:`_batched_gradients`)
        self.batched_vjp = batched_vjp
        self.crops: dict[str, InputWindow] = {}
        #: objective scale under fp16 (see :meth:`_input_gradient`); 1 otherwise (bf16 has float32's range)
        self.grad_scale = 2.0 ** 12 if precision == "fp16" else 1.0
        self.geometry: dict[str, TargetGeometry] | None = None
        #: targets whose objective is zero up to rounding on the first batch (their maps are rounding noise)
        self.blind_targets: set[str] = set()

    @contextmanager
    def _precision_scope(self, x: torch.Tensor):
        """What the forward of ``x`` runs under: nothing for fp32; for bf16 a float32 forward whose convolutions and
        linear layers make bf16 input gradients (:class:`Bf16InputGradients`: the map follows the forward's
        rounding, not the backward's; resnet50 @224 Pearson 0.99999 to fp32, where bf16 autocast with stride ≤ 8
        in float32 gave 0.99918); for fp16 autocast with the high-resolution stages in float32
        (:meth:`_high_resolution_in_fp32`)."""
        if self.precision == "bf16":
            with Bf16InputGradients():
                yield
        elif self.precision == "fp16":
            with self._autocast(), self._high_resolution_in_fp32(x):  # the second reads the autocast state
                yield
        else:
            yield

    def _autocast(self):
        """Autocast in the precision's dtype (the fp16 policy; ``bench/bench_erf.py bf16`` also replays the former
        bf16 autocast policy with it). float16 on CPUs also runs convolutions without oneDNN.

        Why: on CPUs with AVX512-FP16 (Sapphire Rapids) oneDNN's JIT generator for float16 depthwise convolutions of
        15x15 and more does not finish (measured: > 60 s for one 15x15 conv of a 3x128x128 map, which PyTorch's own
        kernel computes in 0.5 s at 31x31); bf16 is not affected.
        """
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        if dtype is torch.float16 and self.device.type == "cpu":
            stack = contextlib.ExitStack()
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
            stack.enter_context(torch.autocast(device_type="cpu", dtype=dtype))
            return stack
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _high_resolution_in_fp32(self, x: torch.Tensor):
        """Under fp16, run the stem and the stages at total stride ≤ ``FP32_MAX_STRIDE`` in float32;
        autocast starts at the first stage beyond (timm ``feature_info``). Models that declare no stages keep
        only the convolutions that read the input itself (the stem) in float32.

        Why: the input gradient is made by the last steps of the backward pass, through the high-resolution layers,
        and the protocols reduce it over RGB with cancellation (Kim et al. average the signed gradient before the
        clamp), so rounding there is what the maps feel most. Measured with bf16 autocast (this was the bf16 policy
        before :mod:`erf_tools.engine.bf16_backward`): resnet50 @224, Kim protocol, 32 images: Pearson to the fp32
        map 0.99789 with only the stem in float32, 0.99928 with stride ≤ 8 in float32, for 23 % more time
        (``bench/RESULTS.md``); the deep stages, where most of the work of RepLKNet and UniConvNet lies at 1024²,
        stay float16.
        """
        if self.precision == "fp32":
            return nullcontext()
        device_type = self.device.type
        states: list[bool] = []

        def before(module, args):
            if args and args[0] is x:
                states.append(torch.is_autocast_enabled(device_type))
                torch.set_autocast_enabled(device_type, False)
                module._erf_fp32_stem = True

        def after(module, args, output):
            if getattr(module, "_erf_fp32_stem", False):
                del module._erf_fp32_stem
                torch.set_autocast_enabled(device_type, states.pop())

        convs = [m for m in self.model.modules() if isinstance(m, nn.Conv2d)]
        handles = [m.register_forward_pre_hook(before) for m in convs] + \
                  [m.register_forward_hook(after, always_call=True) for m in convs]
        outer = torch.is_autocast_enabled(device_type)
        low_resolution = next((self.model.get_submodule(name) for name, reduction
                               in feature_reductions(self.model).items() if reduction > FP32_MAX_STRIDE), None)
        if low_resolution is not None:
            torch.set_autocast_enabled(device_type, False)
            handles.append(low_resolution.register_forward_pre_hook(
                lambda module, args: torch.set_autocast_enabled(device_type, outer)))

        @contextmanager
        def scope():
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
                while states:  # a forward that stopped inside the stem
                    torch.set_autocast_enabled(device_type, states.pop())
                torch.set_autocast_enabled(device_type, outer)

        return scope()

    def process(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample maps (B×H×W, float32) of every target for one batch; splits the batch on out-of-memory."""
        try:
            return self.compute_batch(batch)
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or batch.shape[0] == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"out of memory at batch size {batch.shape[0]}; retrying in halves", stacklevel=2)
            half = batch.shape[0] // 2
            first, second = self.process(batch[:half]), self.process(batch[half:])
            return {k: torch.cat([first[k], second[k]]) for k in first}

    def compute_batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample maps of every target for one batch, without the out-of-memory retry of :meth:`process`."""
        x = batch.to(self.device, torch.float32, non_blocking=True)  # asynchronous from pinned (prefetched) memory
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        input_hw = tuple(x.shape[-2:])
        first = self.geometry is None
        full_targets = [t for t in self.targets if t.module_name not in self.crops]
        maps: dict[str, torch.Tensor] = {}
        candidates: dict[str, InputWindow] = {}
        full_gradients: dict[str, torch.Tensor] = {}
        if full_targets:
            log = LayerLog(self.model) if first else None
            ops = OperatorLog() if first and self.crop_early_targets else None
            with FeatureCapture(self.model, full_targets) as capture:
                if first:
                    capture.on_capture = lambda name: (log.mark(name), ops.mark(name) if ops is not None else None)
                try:
                    with torch.enable_grad(), self._precision_scope(x), \
                            (ops if ops is not None else nullcontext()):
                        outputs = capture.run(x)
                finally:
                    if log is not None:
                        log.close()
            grids = {t.module_name: to_nchw(outputs[t.module_name], self.model, input_hw, t.layout, t.name)
                     for t in full_targets}
            if first:
                self.geometry = self._geometry(grids, log, input_hw)
                if ops is not None:
                    candidates = plan_windows(self.targets, self.geometry, log, ops, input_hw)
            objectives = []
            for target in full_targets:
                grid = grids[target.module_name]
                unit = self.geometry[target.module_name].unit
                objective = centre_objective(grid, unit, self.options)
                if first and self.diagnose and objective_is_blind(grid, unit, self.options):
                    self.blind_targets.add(target.module_name)
                if not objective.requires_grad:
                    raise RuntimeError(
                        f"target {target.name!r} does not depend on the input through differentiable operations"
                    )
                objectives.append(objective)
            if self.batched_vjp and len(objectives) > 1 and self.grad_scale == 1.0:
                gradients = self._batched_gradients(objectives, x)
            else:
                gradients = (self._input_gradient(o, x, retain_graph=i < len(objectives) - 1)
                             for i, o in enumerate(objectives))
            for target, gradient in zip(full_targets, gradients):
                maps[target.module_name] = per_sample_maps(gradient, self.options)
                if target.module_name in candidates:
                    full_gradients[target.module_name] = gradient.detach()
            del objectives, gradients
            del grids, outputs
        for target in self.targets:
            crop = self.crops.get(target.module_name)
            if crop is not None:
                maps[target.module_name] = per_sample_maps(self._cropped_gradient(x, target, crop).float(),
                                                           self.options)
        for name, crop in candidates.items():  # first batch: adopt a crop only if it reproduces the full gradient
            target = next(t for t in self.targets if t.module_name == name)
            if same_gradient(full_gradients[name], self._cropped_gradient(x, target, crop), crop):
                self.crops[name] = crop
        return {t.module_name: maps[t.module_name] for t in self.targets}

    def _input_gradient(self, objective: torch.Tensor, inputs: torch.Tensor, retain_graph: bool) -> torch.Tensor:
        """∂objective/∂inputs in float32; under fp16 with a scaled objective, so that small gradients do not
        underflow float16 (its smallest normal is 6e-5, ERF gradients at 1024² are far smaller).

        The maps are positively homogeneous in the gradient (ReLU, abs, sums, means), so dividing by the scale
        afterwards gives the unscaled maps. On overflow (a non-finite gradient) the scale is divided by 16 and the
        gradient recomputed from the kept graph; at scale 1 non-finite values are the model's own and are left to
        the per-image NaN/Inf rejection.
        """
        if self.grad_scale == 1.0:
            (gradient,) = torch.autograd.grad(objective, inputs, retain_graph=retain_graph)
            return gradient.float()
        while True:
            (gradient,) = torch.autograd.grad(objective * self.grad_scale, inputs, retain_graph=True)
            gradient = gradient.float()
            if self.grad_scale == 1.0 or bool(torch.isfinite(gradient).all()):
                return gradient / self.grad_scale
            self.grad_scale = max(self.grad_scale / 16.0, 1.0)

    @staticmethod
    def _batched_gradients(objectives: list[torch.Tensor], inputs: torch.Tensor) -> list[torch.Tensor]:
        """∂objective_k/∂inputs for every k from one backward pass vmapped over K one-hot cotangents
        (``is_grads_batched``), float32.

        Why it is optional: it trades K sequential backward passes, each from its own target down to the input,
        for one pass that carries all K cotangents through the whole graph (zeros included above the early
        targets); it pays where per-operator overhead dominates (small maps, accelerators), not where the
        convolutions are compute-bound (CPU: 2.2–2.8× one target against 1.3–1.8× sequentially,
        ``bench_erf.py targets``, ``bench/RESULTS.md``).
        """
        stacked = torch.stack([o.float() for o in objectives])
        cotangents = torch.eye(len(objectives), dtype=stacked.dtype, device=stacked.device)
        (gradients,) = torch.autograd.grad(stacked, inputs, grad_outputs=cotangents, is_grads_batched=True)
        return list(gradients.float().unbind(0))

    def _cropped_gradient(self, x: torch.Tensor, target: Target, crop: InputWindow) -> torch.Tensor:
        """The input gradient of ``target``'s centre objective computed on the window ``crop`` of ``x`` only,
        returned at full size (zero outside the window, where it is exactly zero anyway)."""
        window = x.detach()[:, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
        window = window.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        window.requires_grad_(True)
        with FeatureCapture(self.model, [target]) as capture:
            with torch.enable_grad(), self._precision_scope(window):
                output = capture.run(window)[target.module_name]
        grid = to_nchw(output, self.model, (crop.height, crop.width), target.layout, target.name)
        objective = centre_objective(grid, crop.unit, self.options)
        gradient = self._input_gradient(objective, window, retain_graph=False)
        full = gradient.new_zeros(x.shape)
        full[:, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width] = gradient
        return full

    def _geometry(self, grids, log: LayerLog, input_hw) -> dict[str, TargetGeometry]:
        geometry = {}
        for target in self.targets:
            grid = grids[target.module_name]
            channels, height, width = grid.shape[1:]
            if self.options.channels is not None and max(self.options.channels) >= channels:
                raise ValueError(f"channels={self.options.channels} exceeds the {channels} channels of {target.name!r}")
            unit = centre_unit(self.options.centre, height, width)
            events = log.events[: log.marks.get(target.module_name, len(log.events))]
            offsets, strides = path_geometry(events, input_hw, (height, width))
            geometry[target.module_name] = TargetGeometry(
                target, (int(channels), int(height), int(width)), unit, unit_centre(unit, offsets, strides), strides
            )
        return geometry
