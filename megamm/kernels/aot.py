"""Ahead-of-time compilation of the Triton kernels for named GPUs, without a GPU.

The launches are not restated here: :func:`model_launches` calls the wrappers' own
launch builders (``rms_norm._forward_launch`` / ``_backward_launch``,
``rope._rotate_launch``) on meta tensors of a model's shapes, the way the model calls
them (a test checks this against what the wrappers really launch). :func:`specialize`
then does what ``JITFunction.run`` does before it compiles (Triton 3.9): Triton's own
binder turns the arguments into a signature (``*bf16``, ``i32``, or ``i64`` for ints
past 2^31), constexprs (ints equal to 1) and attributes (16-divisibility), under the
named target's backend. :func:`compile_for` compiles that down to a cubin with ptxas
and reads the resource usage back from the cubin with ``cuobjdump``.

Meta tensors report data pointer 0, so pointers are taken 16-byte aligned, as fresh
CUDA allocations and the model's projection views are. The persistent RMSNorm backward
grid is sized for a reference GPU per target (``Target.sms``).

Compiling needs a process whose Triton was imported without ``TRITON_INTERPRET=1``:
in interpreter mode Triton's own library functions (``tl.sum``'s combine function) are
interpreted objects and the compiler cannot inline them.
"""
from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Protocol

import torch

from .dispatch import PROGRAMS_PER_SM, Launch, triton
from .rms_norm import _backward_launch, _forward_launch
from .rope import _rotate_launch, rope_inv_freq

if triton is not None:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler.compiler import get_cache_key
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import create_function_from_signature

EPS = 1e-6
ROPE_THETA = 10000.0  # a runtime input of no kernel: only inv_freq's values depend on it


@dataclass(frozen=True)
class Target:
    """A GPU architecture to compile for, and the SM count of the reference GPU whose
    persistent-grid size (``PROGRAMS_PER_SM`` per SM) the backward launch uses."""

    name: str
    capability: int
    sms: int
    gpu: str

    @property
    def max_programs(self) -> int:
        return PROGRAMS_PER_SM * self.sms

    def gpu_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)


TARGETS: dict[str, Target] = {
    "sm_80": Target("sm_80", 80, 108, "A100"),
    "sm_90": Target("sm_90", 90, 132, "H100 SXM / H200"),
}
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelShape(Protocol):
    """The model dimensions the kernels see (megamm.config.ModelConfig has them)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int


@dataclass(frozen=True)
class Case:
    """Tokens per launch: ``batch`` rows of ``seq`` tokens; ``backward`` when gradients run."""

    name: str
    batch: int
    seq: int
    backward: bool


def model_cases(model: ModelShape) -> dict[str, Case]:
    """The launch shapes of a model, by name:

    - ``train``: one row of ``max_seq_len`` tokens, forward and backward;
    - ``int64``: as many such rows as make rows x d_model reach 2^31 elements;
    - ``int64_args``: one row of enough tokens that q's batch stride passes 2^31, so
      Triton passes it as an i64 (the shape of ``benchmarks/kernel_speed.py --check``);
    - ``decode``: one new token, forward only.
    """
    return {
        "train": Case("train", 1, model.max_seq_len, True),
        "int64": Case("int64", math.ceil(2**31 / (model.max_seq_len * model.d_model)), model.max_seq_len, True),
        "int64_args": Case("int64_args", 1, math.ceil(2**31 / (model.n_heads * model.head_dim)), True),
        "decode": Case("decode", 1, 1, False),
    }


CASES = ("train", "int64", "int64_args", "decode")


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def model_launches(model: ModelShape, case: Case, dtype: torch.dtype, max_programs: int) -> dict[str, Launch]:
    """Every kernel launch of one transformer block at ``case``'s shape, by op name, with
    inputs, weights and gradients of ``dtype``, built by the wrappers' launch builders.

    As the model calls them: ``rms_norm`` and ``add_rms_norm`` on [rows, d_model]
    (backward with both gradients for the fused op), RoPE once for q [B,S,H,Dh] and once
    for k [B,S,G,Dh] with int64 positions [B,S]; the backward ops only when ``case.backward``.
    """
    rows, d, hd = case.batch * case.seq, model.d_model, model.head_dim
    x, w = _meta((rows, d), dtype), _meta((d,), dtype)
    launches: dict[str, Launch] = {}
    launches["rms_norm_fwd"], y, _, rstd = _forward_launch(x, None, w, EPS, dtype)
    if case.backward:
        launches["rms_norm_bwd"] = _backward_launch(
            torch.empty_like(y), x, w, rstd, None, dtype, max_programs
        )[0]
    launches["add_rms_norm_fwd"], y, summed, rstd = _forward_launch(x, torch.empty_like(x), w, EPS, dtype)
    if case.backward:
        launches["add_rms_norm_bwd"] = _backward_launch(
            torch.empty_like(y), summed, w, rstd, torch.empty_like(summed), summed.dtype, max_programs
        )[0]
    positions = _meta((case.batch, case.seq), torch.int64)
    inv_freq = rope_inv_freq(hd, ROPE_THETA, device="meta")
    heads = {"q": model.n_heads, "k": model.n_kv_heads}
    for inverse in (False, True) if case.backward else (False,):
        for name, n in heads.items():
            x = _meta((case.batch, case.seq, n, hd), dtype)
            op = f"rope_{'bwd' if inverse else 'fwd'}_{name}"
            launches[op] = _rotate_launch(x, positions, inv_freq, inverse)[0]
    return launches


@dataclass(frozen=True)
class PlannedLaunch:
    """One launch of the AOT matrix: which model, shape, op and dtype it comes from."""

    preset: str
    case: str
    op: str
    dtype: str
    launch: Launch

    @property
    def label(self) -> str:
        return f"{self.preset} {self.case} {self.op} {self.dtype}"


def launch_plan(
    models: dict[str, ModelShape],
    target: Target,
    dtypes: tuple[str, ...] = tuple(DTYPES),
    cases: tuple[str, ...] = CASES,
) -> list[PlannedLaunch]:
    """The launches of every named model x case x dtype on ``target``'s reference GPU."""
    plan = []
    for preset, model in models.items():
        shapes = model_cases(model)
        for case in cases:
            for dtype in dtypes:
                for op, launch in model_launches(model, shapes[case], DTYPES[dtype], target.max_programs).items():
                    plan.append(PlannedLaunch(preset, case, op, dtype, launch))
    return plan


# ------------------------------------------------------------------ specialize, compile


@dataclass(frozen=True)
class Specialization:
    """What ``JITFunction.run`` would hand ``triton.compile`` for a launch on a target."""

    kernel: str
    source: ASTSource
    options: object  # the backend's options (num_warps, num_stages, ...)
    key: str  # Triton's own compile-cache key: equal keys compile to the same kernel

    @property
    def signature(self) -> dict[str, str]:
        return self.source.signature


@functools.cache
def _binder(jit, capability: int):
    backend = make_backend(GPUTarget("cuda", capability, 32))
    return backend, create_function_from_signature(jit.signature, jit.params, backend)


def specialize(launch: Launch, target: Target) -> Specialization:
    """Triton's specialization of ``launch`` for ``target`` (mirrors ``JITFunction.run``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    jit = launch.kernel.compiled
    backend, binder = _binder(jit, target.capability)
    kwargs = {**launch.constexprs, "num_warps": launch.num_warps}
    kwargs["debug"] = jit.debug or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, extra = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, extra)
    source = ASTSource(jit, signature, constexprs, attrs)
    key = get_cache_key(source, backend, options, env_vars={})
    return Specialization(launch.kernel.name, source, options, key)


@dataclass(frozen=True)
class Compiled:
    """Resource usage of one compiled kernel, per thread unless said otherwise.

    ``n_spills`` is Triton's own figure (``CompiledKernel.n_spills``: local memory bytes
    / 4); ``shared_bytes`` is the shared memory Triton asks for at launch, per program."""

    kernel: str
    n_regs: int
    n_spills: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    cubin_bytes: int
    ttir: str


def require_compiling_triton() -> None:
    """Raise unless this process's Triton can compile (see the module docstring)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    from triton.language import standard

    if any(isinstance(v, InterpretedFunction) for v in vars(standard).values()):
        raise RuntimeError(
            "Triton was imported with TRITON_INTERPRET=1 and cannot compile; "
            "run the ahead-of-time compile in a process started without it"
        )


def compile_for(target: Target, launch: Launch) -> Compiled:
    """Compile ``launch`` for ``target`` down to a cubin (raises on a compile error)."""
    require_compiling_triton()
    spec = specialize(launch, target)
    kernel = triton.compile(spec.source, target=target.gpu_target(), options=spec.options.__dict__)
    cubin = kernel.asm["cubin"]
    usage = cubin_resource_usage(cubin, spec.kernel)
    return Compiled(
        kernel=spec.kernel,
        n_regs=usage["REG"],
        n_spills=usage["LOCAL"] // 4,
        local_bytes=usage["LOCAL"],
        stack_bytes=usage["STACK"],
        shared_bytes=kernel.metadata.shared,
        cubin_bytes=len(cubin),
        ttir=kernel.asm["ttir"],
    )


_USAGE = re.compile(r"Function (\S+):\s*\n\s*(.*)")


def cubin_resource_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of ``kernel`` in ``cubin``: REG, STACK, SHARED,
    LOCAL, ... as ints."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
            check=True, capture_output=True, text=True,
        ).stdout
    for name, fields in _USAGE.findall(out):
        if name == kernel:
            return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", fields)}
    raise RuntimeError(f"cuobjdump reports no function {kernel!r} in the cubin:\n{out}")


_ADDPTR = re.compile(r"= tt\.addptr [^:]+: (.+)$", re.MULTILINE)


def scalar_offset_types(ttir: str) -> list[str]:
    """The offset type of every scalar ``tt.addptr`` (a pointer plus a row, token or
    program offset) in a kernel's TTIR; tensor-of-pointer additions are left out."""
    types = []
    for operand_types in _ADDPTR.findall(ttir):
        pointer, offset = (t.strip() for t in operand_types.rsplit(",", 1))
        if pointer.startswith("!tt.ptr"):
            types.append(offset.split(" ")[0])
    return types
