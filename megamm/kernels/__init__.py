"""Fused Triton kernels for the transformer block (installed as ``megamm.kernels``).

Each op runs its Triton kernel when Triton can run on the input (a CUDA tensor, or a
CPU tensor with ``TRITON_INTERPRET=1`` set at call time) and otherwise its plain torch
reference, which is exported next to it for tests and benchmarks. ``megamm.kernels.aot``
compiles the kernels ahead of time for named GPUs (no GPU needed).
"""
from .dispatch import kernels_available
from .rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rope",
    "apply_rope_reference",
    "kernels_available",
    "rms_norm",
    "rms_norm_reference",
]
