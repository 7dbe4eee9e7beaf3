"""C++ extensions built on first use, once per process, with a reference fallback and one warning.

Shared by the fused DCNv3 core (:mod:`erf_tools.layers.dcnv3_fused`), the compiled dead-leaves painter
(:mod:`erf_tools.synthetic_images`) and, through :class:`BuiltOnFirstUse`, the Triton DCNv3 kernels
(:mod:`erf_tools.layers.dcnv3_triton`). Each C++ one has

* a :class:`CppExtension`: its source, compiled with :func:`torch.utils.cpp_extension.load` (a C++ compiler and the
  ``ninja`` build tool) into the torch extensions directory (``TORCH_EXTENSIONS_DIR``, by default
  ``~/.cache/torch_extensions``), once per source version and instruction set; the build is tried once per process
  under a lock, and a failure is remembered (a missing compiler costs one attempt, not one per call);
* a :class:`BackendChoice`: ``auto`` (the compiled path where it applies, else the reference, with one warning if
  the build failed), the compiled path's name (an error if it cannot be built) or ``reference``, read from an
  environment variable unless set in code.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BackendChoice", "BuildState", "BuiltOnFirstUse", "CppExtension", "ExtensionUnavailable", "cpu_flags",
           "instruction_set"]


class ExtensionUnavailable(RuntimeError):
    """A C++ extension could not be built or loaded (the message says why)."""


@dataclass
class BuildState:
    """The outcome of the one build attempt of a process: loaded (with the Python module, if any), or the error."""

    loaded: bool = False
    module: Any = None
    error: str | None = None
    warned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def instruction_set() -> tuple[str, list[str]]:
    """The vector instruction set torch detected on this CPU and the compiler flags for it.

    It is part of an extension's name, so that a cache directory shared by different machines never hands an
    AVX-512 build to a CPU without AVX-512."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    flags = {"avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw"],
             "avx2": ["-mavx2", "-mfma"]}
    return (capability, flags[capability]) if capability in flags else ("default", [])


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``/proc/cpuinfo``); empty where that file is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


class BuiltOnFirstUse:
    """Something built once per process on first use (a C++ extension, GPU kernels), remembered if it fails.

    what: how messages name it. error: the :class:`ExtensionUnavailable` subclass raised when it cannot be built.
    Subclasses implement ``_build`` (returns what :meth:`load` hands back, raises on failure)."""

    def __init__(self, *, what: str, error: type[ExtensionUnavailable] = ExtensionUnavailable) -> None:
        self.what, self.error = what, error
        self.state = BuildState()

    def load(self) -> Any:
        """Build (first time only) and load; the built object (e.g. a module) or ``None``.

        Raises ``self.error`` if that is impossible, every time, after one attempt per process."""
        state = self.state
        with state.lock:
            if state.loaded:
                return state.module
            if state.error is None:
                try:
                    state.module = self._build()
                    state.loaded = True
                    return state.module
                except Exception as error:  # noqa: BLE001 - a compiler, ninja or loader failure of any kind
                    state.error = f"{type(error).__name__}: {error}".strip()
            raise self.error(f"{self.what} could not be built: {state.error}")

    def available(self) -> bool:
        """Whether it is built and loaded (builds it on the first call)."""
        try:
            self.load()
        except ExtensionUnavailable:
            return False
        return True

    def wanted(self, backend: str, fallback: str, stacklevel: int = 2) -> bool:
        """Whether to run the compiled path under ``backend`` (a :meth:`BackendChoice.get` value).

        ``reference``: no; ``auto``: yes if it builds, else no, with one warning per process (``fallback`` says what
        runs instead and how to silence it; ``stacklevel`` as for :func:`warnings.warn`, counted from the caller);
        the compiled path's own name: yes, or ``self.error`` if it cannot be built."""
        if backend == "reference":
            return False
        if backend != "auto":
            self.load()
            return True
        try:
            self.load()
        except ExtensionUnavailable as error:
            if not self.state.warned:
                self.state.warned = True
                warnings.warn(f"{error}; {fallback}", RuntimeWarning, stacklevel=stacklevel + 1)
            return False
        return True

    def _build(self) -> Any:
        raise NotImplementedError


class CppExtension(BuiltOnFirstUse):
    """One C++ source built into an extension on first use (see the module docstring).

    name: the extension's name (the instruction set is appended). source: the ``.cpp`` file. what: how messages
    name it. error: the :class:`ExtensionUnavailable` subclass raised when it cannot be built. openmp: compile and
    link with ``-fopenmp``. extra_cflags: more compiler flags. python_module: the source defines a pybind11 module
    (``PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)``), which :meth:`load` returns; otherwise it registers torch ops
    and :meth:`load` returns ``None``. after_load: called once after a successful load (e.g. to register fake
    kernels)."""

    def __init__(self, name: str, source: Path, *, what: str, error: type[ExtensionUnavailable] = ExtensionUnavailable,
                 openmp: bool = False, extra_cflags: Sequence[str] = (), python_module: bool = False,
                 after_load: Callable[[], None] | None = None) -> None:
        super().__init__(what=what, error=error)
        self.name, self.source = name, Path(source)
        self.openmp, self.extra_cflags, self.python_module = openmp, list(extra_cflags), python_module
        self.after_load = after_load

    def _build(self) -> Any:
        if not self.source.is_file():
            raise FileNotFoundError(f"missing kernel source {self.source.name}")
        # importing cpp_extension logs a CUDA_HOME notice on machines without CUDA: irrelevant to CPU kernels
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_logger.level
        cpp_logger.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load
        finally:
            cpp_logger.setLevel(level)

        capability, isa_flags = instruction_set()
        openmp = ["-fopenmp"] if self.openmp else []
        module = load(name=f"{self.name}_{capability}", sources=[str(self.source)],
                      extra_cflags=["-O3", *openmp, *isa_flags, *self.extra_cflags], extra_ldflags=openmp,
                      is_python_module=self.python_module, verbose=False)
        if self.after_load is not None:
            self.after_load()
        return module if self.python_module else None


class BackendChoice:
    """A process-wide choice among ``auto``, a compiled path and ``reference``: set in code, else read from an
    environment variable, else ``auto``."""

    def __init__(self, env_var: str, compiled: str, what: str) -> None:
        self.env_var, self.what = env_var, what
        self.names = ("auto", compiled, "reference")
        self.override: str | None = None  # None: read the environment variable

    def check(self, name: str) -> str:
        if name not in self.names:
            raise ValueError(f"{self.what} backend must be one of {self.names}, got {name!r}")
        return name

    def get(self) -> str:
        """The backend in force: the one set by :meth:`set`, else the environment variable, else ``auto``."""
        if self.override is not None:
            return self.override
        return self.check(os.environ.get(self.env_var, "auto").strip().lower() or "auto")

    def set(self, name: str | None) -> str | None:
        """Force one backend; ``None`` goes back to the environment variable. Returns the previous setting (``None``
        if it came from the environment)."""
        previous = self.override
        self.override = None if name is None else self.check(name)
        return previous

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """``with choice.use("reference"): ...`` runs the block with that backend."""
        previous = self.set(name)
        try:
            yield
        finally:
            self.override = previous
