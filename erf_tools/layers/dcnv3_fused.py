"""A fused CPU kernel for the DCNv3 sampling core, built on first use; the ``grid_sample`` core stays the reference.

The ``grid_sample`` formulation of :func:`erf_tools.layers.dcnv3.dcnv3_core` materialises every bilinear sample,
(N, G, C/G, P, H·W), before the mask-weighted sum over the P kernel points, and its backward goes through
``grid_sampler_2d_backward``; on a CPU that is half of a UniConvNet pass at 1024 px. The C++ kernel in
``csrc/dcnv3_cpu.cpp`` does the gather, the mask and the sum in one pass per output pixel, and a hand-written
backward for value, offset and mask (value gradient scattered into per-thread buffers summed at the end: no
atomics, deterministic for a given thread count). It computes the same function (same positions, zero padding,
dilation, group layout), equal to the reference to float rounding.

The extension is compiled on first use by :mod:`erf_tools.extension_build` (needs a C++ compiler with OpenMP and
the ``ninja`` build tool) into the torch extensions directory (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per source version. If that fails the reference is used, with one warning.

Choose the path with the environment variable ``ERF_TOOLS_DCNV3_CORE`` (``auto``, the default: fused where it
applies, else the reference; ``fused``: fused, an error if it cannot be built; ``reference``: always
``grid_sample``), or with :func:`set_core_backend` / the :func:`core_backend` context manager. The same choice
applies to the Triton kernels on CUDA (:mod:`erf_tools.layers.dcnv3_triton`): ``fused`` there means Triton.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from erf_tools.extension_build import BackendChoice, CppExtension, ExtensionUnavailable

__all__ = [
    "BACKENDS",
    "EXTENSION",
    "FALLBACK",
    "FUSED_DTYPES",
    "FusedCoreUnavailable",
    "core_backend",
    "fused_core_available",
    "fused_dcnv3_core",
    "fused_kernel_takes",
    "get_core_backend",
    "load_extension",
    "set_core_backend",
    "use_fused_core",
]

ENV_VAR = "ERF_TOOLS_DCNV3_CORE"
SOURCE = Path(__file__).with_name("csrc") / "dcnv3_cpu.cpp"
EXTENSION_NAME = "erf_tools_dcnv3_cpu"
#: what the fused kernels (C++ on CPU, Triton on CUDA) take: one of these dtypes, strided tensors, one device
FUSED_DTYPES = (torch.float32, torch.float64)
#: what runs instead when ``auto`` cannot build a fused kernel (the end of its one warning)
FALLBACK = f"using the grid_sample reference (slower). Set {ENV_VAR}=reference to silence this."


class FusedCoreUnavailable(ExtensionUnavailable):
    """The fused DCNv3 extension could not be built or loaded (the message says why)."""


def _register_fake() -> None:
    """Shape functions, so that tracing (``torch.compile``, meta tensors) sees the op's outputs."""

    @torch.library.register_fake("erf_tools_dcnv3::forward")
    def _forward_fake(value, offset, mask, group, kernel_size, stride, pad, dilation, offset_scale):
        return value.new_empty((*offset.shape[:3], value.shape[3]))

    @torch.library.register_fake("erf_tools_dcnv3::backward")
    def _backward_fake(grad_out, value, offset, mask, group, kernel_size, stride, pad, dilation, offset_scale):
        return torch.empty_like(value), torch.empty_like(offset), torch.empty_like(mask)


#: The extension (its build state: ``EXTENSION.state``); it registers the ops ``erf_tools_dcnv3::forward/backward``.
EXTENSION = CppExtension(EXTENSION_NAME, SOURCE, what="the fused DCNv3 CPU core", error=FusedCoreUnavailable,
                         openmp=True, after_load=_register_fake)
_CHOICE = BackendChoice(ENV_VAR, "fused", "DCNv3 core")
BACKENDS = _CHOICE.names


def get_core_backend() -> str:
    """The backend in force: the one set by :func:`set_core_backend`, else ``$ERF_TOOLS_DCNV3_CORE``, else auto."""
    return _CHOICE.get()


def set_core_backend(name: str | None) -> str | None:
    """Force ``"fused"`` or ``"reference"``, or ``"auto"``; ``None`` goes back to the environment variable.

    Returns the previous setting (``None`` if it came from the environment)."""
    return _CHOICE.set(name)


@contextmanager
def core_backend(name: str) -> Iterator[None]:
    """``with core_backend("reference"): ...`` runs the block with that backend."""
    with _CHOICE.use(name):
        yield


def load_extension() -> None:
    """Build (first time only, cached on disk) and load the extension; :class:`FusedCoreUnavailable` if impossible.

    Tried once per process: a failure is remembered, so a missing compiler costs one attempt, not one per call."""
    EXTENSION.load()


def fused_core_available() -> bool:
    """Whether the extension is built and loaded (builds it on the first call)."""
    return EXTENSION.available()


def use_fused_core(*tensors: torch.Tensor) -> bool:
    """Whether :func:`~erf_tools.layers.dcnv3.dcnv3_core` should run the fused kernel on these inputs.

    ``auto``: yes for CPU float32/float64 tensors when the extension builds (else one warning, then the reference);
    ``fused``: the same, but an input it cannot take or a failed build is an error; ``reference``: never."""
    backend = get_core_backend()
    if backend == "reference":
        return False
    if not fused_kernel_takes(tensors, "cpu"):
        if backend == "fused":
            raise ValueError("the fused DCNv3 core takes CPU (C++) or CUDA (Triton) float32/float64 tensors of one "
                             "dtype, got "
                             + ", ".join(f"{t.device.type} {t.dtype}" for t in tensors))
        return False
    return EXTENSION.wanted(backend, FALLBACK, stacklevel=3)


def fused_kernel_takes(tensors: tuple[torch.Tensor, ...], device_type: str) -> bool:
    """Whether a fused kernel takes these inputs: strided tensors on ``device_type``, of one :data:`FUSED_DTYPES`
    dtype."""
    return all(t.device.type == device_type and t.dtype in FUSED_DTYPES and t.layout == torch.strided
               for t in tensors) and len({t.dtype for t in tensors}) == 1


class _FusedCore(torch.autograd.Function):
    """Autograd wrapper of the two C++ ops; first-order gradients only (an ERF needs no more)."""

    @staticmethod
    def forward(ctx, value, offset, mask, geometry):
        ctx.geometry = geometry
        ctx.save_for_backward(value, offset, mask)
        return torch.ops.erf_tools_dcnv3.forward(value, offset, mask, *geometry)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, offset, mask = ctx.saved_tensors
        grads = torch.ops.erf_tools_dcnv3.backward(grad_out.contiguous(), value, offset, mask, *ctx.geometry)
        needed = ctx.needs_input_grad
        return (*(g if need else None for g, need in zip(grads, needed[:3])), None)


def fused_dcnv3_core(
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    group: int,
    kernel_size: int = 3,
    stride: int = 1,
    pad: int = 1,
    dilation: int = 1,
    offset_scale: float = 1.0,
) -> torch.Tensor:
    """The DCNv3 core by the fused kernel: same arguments, layout and result as
    :func:`erf_tools.layers.dcnv3.dcnv3_core` (which validates the shapes and calls this when
    :func:`use_fused_core` says so). CPU float32/float64 only; :class:`FusedCoreUnavailable` if it cannot be built."""
    load_extension()
    geometry = (int(group), int(kernel_size), int(stride), int(pad), int(dilation), float(offset_scale))
    return _FusedCore.apply(value.contiguous(), offset.contiguous(), mask.contiguous(), geometry)
