"""A fused CPU kernel for the DCNv3 sampling core, built on first use; the ``grid_sample`` core stays the reference.

The ``grid_sample`` formulation of :func:`erf_tools.layers.dcnv3.dcnv3_core` materialises every bilinear sample,
(N, G, C/G, P, H·W), before the mask-weighted sum over the P kernel points, and its backward goes through
``grid_sampler_2d_backward``; on a CPU that is half of a UniConvNet pass at 1024 px. The C++ kernel in
``csrc/dcnv3_cpu.cpp`` does the gather, the mask and the sum in one pass per output pixel, and a hand-written
backward for value, offset and mask (value gradient scattered into per-thread buffers summed at the end: no
atomics, deterministic for a given thread count). It computes the same function (same positions, zero padding,
dilation, group layout), equal to the reference to float rounding.

The extension is compiled with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler with OpenMP and the
``ninja`` build tool) into the torch extensions directory (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per source version. If that fails the reference is used, with one warning.

Choose the path with the environment variable ``ERF_TOOLS_DCNV3_CORE`` (``auto``, the default: fused where it
applies, else the reference; ``fused``: fused, an error if it cannot be built; ``reference``: always
``grid_sample``), or with :func:`set_core_backend` / the :func:`core_backend` context manager.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "BACKENDS",
    "FusedCoreUnavailable",
    "core_backend",
    "fused_core_available",
    "fused_dcnv3_core",
    "get_core_backend",
    "load_extension",
    "set_core_backend",
    "use_fused_core",
]

BACKENDS = ("auto", "fused", "reference")
ENV_VAR = "ERF_TOOLS_DCNV3_CORE"
SOURCE = Path(__file__).with_name("csrc") / "dcnv3_cpu.cpp"
EXTENSION_NAME = "erf_tools_dcnv3_cpu"
_FUSED_DTYPES = (torch.float32, torch.float64)


class FusedCoreUnavailable(RuntimeError):
    """The fused DCNv3 extension could not be built or loaded (the message says why)."""


class _State:
    """Process-wide: the chosen backend and the outcome of the one build attempt."""

    def __init__(self) -> None:
        self.backend: str | None = None  # None: read the environment variable
        self.loaded = False
        self.error: str | None = None
        self.warned = False
        self.lock = threading.Lock()


_state = _State()


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"DCNv3 core backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_core_backend() -> str:
    """The backend in force: the one set by :func:`set_core_backend`, else ``$ERF_TOOLS_DCNV3_CORE``, else auto."""
    if _state.backend is not None:
        return _state.backend
    return _check_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def set_core_backend(name: str | None) -> str | None:
    """Force ``"fused"`` or ``"reference"``, or ``"auto"``; ``None`` goes back to the environment variable.

    Returns the previous setting (``None`` if it came from the environment)."""
    previous = _state.backend
    _state.backend = None if name is None else _check_backend(name)
    return previous


@contextmanager
def core_backend(name: str) -> Iterator[None]:
    """``with core_backend("reference"): ...`` runs the block with that backend."""
    previous = set_core_backend(name)
    try:
        yield
    finally:
        _state.backend = previous


def load_extension() -> None:
    """Build (first time only, cached on disk) and load the extension; :class:`FusedCoreUnavailable` if impossible.

    Tried once per process: a failure is remembered, so a missing compiler costs one attempt, not one per call."""
    with _state.lock:
        if _state.loaded:
            return
        if _state.error is None:
            try:
                _build()
                _state.loaded = True
                return
            except Exception as error:  # noqa: BLE001 - a compiler, ninja or loader failure of any kind
                _state.error = f"{type(error).__name__}: {error}".strip()
        raise FusedCoreUnavailable(f"the fused DCNv3 CPU core could not be built: {_state.error}")


def _build() -> None:
    if not SOURCE.is_file():
        raise FileNotFoundError(f"missing kernel source {SOURCE.name}")
    # importing cpp_extension logs a CUDA_HOME notice on machines without CUDA: irrelevant to a CPU-only kernel
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_logger.setLevel(level)

    capability, isa_flags = _instruction_set()
    load(name=f"{EXTENSION_NAME}_{capability}", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *isa_flags],
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    _register_fake()


def _instruction_set() -> tuple[str, list[str]]:
    """The vector instruction set torch detected on this CPU and the compiler flags for it.

    It is part of the extension's name, so that a cache directory shared by different machines never hands an
    AVX-512 build to a CPU without AVX-512."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    flags = {"avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw"],
             "avx2": ["-mavx2", "-mfma"]}
    return (capability, flags[capability]) if capability in flags else ("default", [])


def _register_fake() -> None:
    """Shape functions, so that tracing (``torch.compile``, meta tensors) sees the op's outputs."""

    @torch.library.register_fake("erf_tools_dcnv3::forward")
    def _forward_fake(value, offset, mask, group, kernel_size, stride, pad, dilation, offset_scale):
        return value.new_empty((*offset.shape[:3], value.shape[3]))

    @torch.library.register_fake("erf_tools_dcnv3::backward")
    def _backward_fake(grad_out, value, offset, mask, group, kernel_size, stride, pad, dilation, offset_scale):
        return torch.empty_like(value), torch.empty_like(offset), torch.empty_like(mask)


def fused_core_available() -> bool:
    """Whether the extension is built and loaded (builds it on the first call)."""
    try:
        load_extension()
    except FusedCoreUnavailable:
        return False
    return True


def use_fused_core(*tensors: torch.Tensor) -> bool:
    """Whether :func:`~erf_tools.layers.dcnv3.dcnv3_core` should run the fused kernel on these inputs.

    ``auto``: yes for CPU float32/float64 tensors when the extension builds (else one warning, then the reference);
    ``fused``: the same, but an input it cannot take or a failed build is an error; ``reference``: never."""
    backend = get_core_backend()
    if backend == "reference":
        return False
    eligible = all(t.device.type == "cpu" and t.dtype in _FUSED_DTYPES and t.layout == torch.strided
                   for t in tensors) and len({t.dtype for t in tensors}) == 1
    if backend == "fused":
        if not eligible:
            raise ValueError("the fused DCNv3 core takes CPU float32/float64 tensors of one dtype, got "
                             + ", ".join(f"{t.device.type} {t.dtype}" for t in tensors))
        load_extension()
        return True
    if not eligible:
        return False
    try:
        load_extension()
    except FusedCoreUnavailable as error:
        if not _state.warned:
            _state.warned = True
            warnings.warn(f"{error}; using the grid_sample reference (slower). Set {ENV_VAR}=reference to "
                          "silence this.", RuntimeWarning, stacklevel=3)
        return False
    return True


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
