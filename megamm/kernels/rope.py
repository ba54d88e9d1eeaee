"""Rotary position embedding (RoPE): Triton kernel, autograd, torch reference.

Convention: Hugging Face Llama's ``rotate_half``. For head dim ``d`` and ``i < d/2``

    inv_freq[i] = 1 / theta ** (2i / d)         angle = position * inv_freq
    out[i]       = x[i] * cos - x[i + d/2] * sin
    out[i + d/2] = x[i + d/2] * cos + x[i] * sin

Positions are per token (``[batch, seq]``), so packed documents restart at 0.

Design: cos/sin are computed inside the kernel, in fp32, from the token's position and
a ``d/2``-entry fp32 ``inv_freq`` table that is built with the same torch expression as
the reference (so the kernel and the reference see bit-identical angles); there is no
``[max_seq, d]`` cos/sin cache. One program handles one token and all its heads. The
same kernel is launched once for q and once for k. Backward is the inverse rotation
(rotation by -angle), done by the same kernel with ``INVERSE=True``.
"""
from __future__ import annotations

import torch

from .dispatch import Launch, kernels_available, tl, triton, triton_kernel

# Elements per half-head tile a program holds at once ([heads, d/2]).
_TILE_ELEMENTS = 4096


# --------------------------------------------------------------------------- reference


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``head_dim // 2`` fp32 inverse frequencies ``1 / theta ** (2i / head_dim)``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos`` and ``sin`` of shape ``positions.shape + (head_dim,)`` (halves repeated)."""
    angle = positions.float()[..., None] * rope_inv_freq(head_dim, theta, positions.device)
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos(), angle.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch RoPE, fp32 compute, results in the input dtypes.

    q ``[batch, seq, n_heads, head_dim]``, k ``[batch, seq, n_kv_heads, head_dim]``,
    positions ``[batch, seq]`` integers.
    """
    _check_shapes(q, k, positions)
    cos, sin = rope_cos_sin(positions.expand(q.shape[:2]), q.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rotate(q), rotate(k)


# --------------------------------------------------------------------------- kernel


@triton_kernel
def _rope_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    inv_freq_ptr,
    seq_len,
    n_heads,
    half,
    x_stride_b,
    x_stride_s,
    x_stride_h,
    out_stride_b,
    out_stride_s,
    out_stride_h,
    pos_stride_b,
    pos_stride_s,
    INVERSE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len

    pos = tl.load(pos_ptr + b * pos_stride_b + s * pos_stride_s).to(tl.float32)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    angle = pos * tl.load(inv_freq_ptr + d, mask=d_mask, other=0.0)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    if INVERSE:
        sin = -sin

    x_token = x_ptr + b * x_stride_b + s * x_stride_s
    out_token = out_ptr + b * out_stride_b + s * out_stride_s
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (h < n_heads)[:, None] & d_mask[None, :]
        x_first = x_token + h[:, None] * x_stride_h + d[None, :]
        out_first = out_token + h[:, None] * out_stride_h + d[None, :]
        x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_first + half, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        tl.store(out_first, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_first + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch


def _rotate_launch(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool
) -> tuple[Launch, torch.Tensor]:
    """The launch that rotates ``x`` [batch, seq, heads, head_dim] by +angle (or -angle
    when ``inverse``) by per-token ``positions`` [batch, seq], and its output."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, seq, n_heads, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(n_heads), max(1, _TILE_ELEMENTS // block_d))
    args = (
        x,
        out,
        positions,
        inv_freq,
        seq,
        n_heads,
        half,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        positions.stride(0),
        positions.stride(1),
    )
    constexprs = {"INVERSE": inverse, "BLOCK_H": block_h, "BLOCK_D": block_d}
    num_warps = 4 if block_h * block_d <= 1024 else 8
    return Launch(_rope_kernel, (batch * seq,), args, constexprs, num_warps), out


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    launch, out = _rotate_launch(x, positions, inv_freq, inverse)
    launch()
    return out


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, theta):
        ctx.set_materialize_grads(False)
        positions = positions.expand(q.shape[:2])
        inv_freq = rope_inv_freq(q.shape[-1], theta, q.device)
        ctx.save_for_backward(positions, inv_freq)
        return _rotate(q, positions, inv_freq, False), _rotate(k, positions, inv_freq, False)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        positions, inv_freq = ctx.saved_tensors
        dq = _rotate(dq_rot, positions, inv_freq, True) if dq_rot is not None else None
        dk = _rotate(dk_rot, positions, inv_freq, True) if dk_rot is not None else None
        return dq, dk, None, None


# --------------------------------------------------------------------------- public API


def _check_shapes(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, seq, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    if q.shape[-1] % 2:
        raise ValueError(f"head_dim must be even, got {q.shape[-1]}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    try:
        torch.broadcast_shapes(positions.shape, q.shape[:2])
    except RuntimeError as e:
        raise ValueError(f"positions {tuple(positions.shape)} do not broadcast to [batch, seq] {tuple(q.shape[:2])}") from e
    if positions.dim() > 2:
        raise ValueError(f"positions must be [batch, seq], got {tuple(positions.shape)}")


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[batch, seq, n_heads, head_dim]`` and k ``[batch, seq, n_kv_heads, head_dim]``
    by per-token ``positions`` ``[batch, seq]`` (a ``[seq]`` tensor is broadcast over batch).

    Returns ``(q_rot, k_rot)`` in the input dtypes, as new tensors. Runs the Triton
    kernel when it can run on ``q`` (see ``kernels_available``), otherwise
    :func:`apply_rope_reference`. Differentiable wrt ``q`` and ``k``.
    """
    _check_shapes(q, k, positions)
    usable = (
        kernels_available(q)
        and k.device == q.device
        and positions.device == q.device
        and q.numel() > 0
        and k.numel() > 0
    )
    if not usable:
        return apply_rope_reference(q, k, positions, theta)
    return _RoPEFunction.apply(q, k, positions, theta)
