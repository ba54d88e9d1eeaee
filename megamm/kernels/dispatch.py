"""When the Triton kernels can run, and how they are launched.

Triton runs on CUDA tensors, and on CPU tensors through its interpreter when
``TRITON_INTERPRET=1`` is set. The environment is read at call time, not at import
time: ``triton.jit`` on its own fixes compiled-vs-interpreted when the kernel module
is imported, so kernels here are wrapped in :func:`triton_kernel`, which builds the
compiled or the interpreted form on first launch in each mode.

Every launch is first built as a :class:`Launch` (grid, runtime arguments in the
kernel's parameter order, constexprs, num_warps) by one function per kernel; the
wrappers call it, and :mod:`megamm.kernels.aot` builds the same launches on meta
tensors to compile them for named GPUs without one.

If Triton cannot be imported at all, :func:`kernels_available` is False and every
public op runs its torch reference.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # e.g. a platform without Triton wheels
    triton = None
    InterpretedFunction = JITFunction = None
    HAS_TRITON = False

    class _TritonLanguageStandIn:
        """Lets kernel modules be imported (their `tl.constexpr` annotations evaluate)
        when Triton is missing; the kernels are never launched then."""

        constexpr = None

    tl = _TritonLanguageStandIn()


def interpreter_requested() -> bool:
    """True when the caller asked for Triton's CPU interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_available(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``tensor``'s device right now."""
    if not HAS_TRITON:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and interpreter_requested()


class _Kernel:
    """A Triton kernel whose compiled / interpreted form is chosen when it is launched."""

    def __init__(self, fn):
        self.fn = fn
        self._by_mode: dict[bool, object] = {}

    def _for_mode(self, interpret: bool):
        kernel = self._by_mode.get(interpret)
        if kernel is None:
            if interpret:
                kernel = InterpretedFunction(self.fn)
            else:
                kernel = JITFunction(self.fn)
            self._by_mode[interpret] = kernel
        return kernel

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def compiled(self):
        """The compiled form (a ``triton.JITFunction``), whatever the environment says."""
        return self._for_mode(False)

    def __getitem__(self, grid):
        return self._for_mode(interpreter_requested())[grid]


def triton_kernel(fn) -> _Kernel:
    """Decorator used instead of ``triton.jit`` for the kernels in this package."""
    return _Kernel(fn)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, complete: what Triton specializes a compiled kernel on (the
    arguments' dtypes and values, the constexprs, num_warps) and the grid. ``args`` are
    the runtime arguments in the kernel's parameter order (tensors, ints, floats)."""

    kernel: _Kernel
    grid: tuple[int, ...]
    args: tuple
    constexprs: Mapping[str, object]
    num_warps: int

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


PROGRAMS_PER_SM = 4
"""Programs per streaming multiprocessor in the grid of persistent kernels (RMSNorm backward)."""


def program_count(device: torch.device) -> int:
    """The grid of persistent kernels on ``device``: ``PROGRAMS_PER_SM`` per SM on CUDA.
    On CPU (interpreter) a small fixed count is enough."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 8
