"""RMSNorm and fused residual-add + RMSNorm: Triton kernels, autograd, torch reference.

    y = x * rsqrt(mean(x^2, last dim) + eps) * weight

Everything is computed in fp32 and cast once, on store. Any leading dims are
flattened into rows; the last dim is normalised.

Forward: one program per row; it also stores the row's fp32 ``rstd`` for backward.

Backward: a persistent grid of a few programs per SM. Each program walks a contiguous
block of rows, writes dx for each row, and keeps a running fp32 sum of ``dy * x_hat``
for its rows in registers. At the end each program stores that partial dW row into a
``[programs, hidden]`` fp32 buffer, and one ``sum(0)`` gives dW. No atomics (bf16
atomics are unsupported in places, and fp32 atomics make dW nondeterministic).

``add_rms_norm`` fuses ``s = x + residual`` with the norm of ``s``; its backward adds
the incoming gradient of ``s`` (the residual stream) into dx in the same kernel.
Nothing is written in place: the incoming gradients stay untouched.
"""
from __future__ import annotations

import torch

from .dispatch import Launch, kernels_available, program_count, tl, triton, triton_kernel

# Rows longer than this run the torch reference: one row must fit a program's registers.
MAX_FUSED_COLS = 65536


# --------------------------------------------------------------------------- reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain torch RMSNorm, fp32 compute, result in ``x.dtype``."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch residual add followed by RMSNorm: ``(rms_norm(x + residual), x + residual)``."""
    new_residual = x + residual
    return rms_norm_reference(new_residual, weight, eps), new_residual


# --------------------------------------------------------------------------- kernels


@triton_kernel
def _rms_norm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    sum_ptr,
    rstd_ptr,
    n_cols,
    x_row_stride,
    res_row_stride,
    y_row_stride,
    sum_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_row_stride + cols, s, mask=mask)
        # Normalise the stored (rounded) sum, so y == rms_norm(new_residual) exactly.
        x = s.to(tl.float32)

    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.rsqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton_kernel
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dres_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    dy_row_stride,
    x_row_stride,
    dres_row_stride,
    dx_row_stride,
    HAS_DRES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        w_dy = w * dy
        # d/dx of x*rstd: rstd * (g - x_hat * mean(g * x_hat)), with g = w * dy.
        proj = tl.sum(w_dy * x_hat, axis=0) / n_cols
        dx = (w_dy - x_hat * proj) * rstd
        if HAS_DRES:
            dx += tl.load(dres_ptr + row * dres_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat

    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


# --------------------------------------------------------------------------- launch


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as [rows, hidden] with a unit column stride (copying only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _launch_config(n_cols: int) -> tuple[int, int]:
    """One row per register tile; more warps for wider rows (at 4096 wide and 8 warps the
    sm_90 backward uses ~144 registers a thread and does not spill)."""
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32
    return block, num_warps


def _forward_launch(
    x2d: torch.Tensor,
    res2d: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[Launch, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The forward launch and its outputs ``(y, summed or None, rstd)``, allocated on
    ``x2d``'s device (meta tensors give the launch without running anything)."""
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    summed = torch.empty_like(y) if res2d is not None else None
    block, num_warps = _launch_config(n_cols)
    args = (
        x2d,
        res2d if res2d is not None else x2d,
        weight,
        y,
        summed if summed is not None else y,
        rstd,
        n_cols,
        x2d.stride(0),
        res2d.stride(0) if res2d is not None else 0,
        y.stride(0),
        summed.stride(0) if summed is not None else 0,
        eps,
    )
    constexprs = {"HAS_RESIDUAL": res2d is not None, "BLOCK_N": block}
    return Launch(_rms_norm_fwd_kernel, (n_rows,), args, constexprs, num_warps), y, summed, rstd


def _forward(
    x2d: torch.Tensor,
    res2d: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    launch, y, summed, rstd = _forward_launch(x2d, res2d, weight, eps, out_dtype)
    launch()
    return y, summed, rstd


def _backward_launch(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dres2d: torch.Tensor | None,
    dx_dtype: torch.dtype,
    max_programs: int,
) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """The backward launch on a persistent grid of at most ``max_programs`` programs, and
    its outputs ``(dx, dw_partial)`` (``[programs, hidden]`` fp32, to be summed over rows)."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty((n_rows, n_cols), dtype=dx_dtype, device=x2d.device)
    programs = min(max_programs, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2d.device)
    block, num_warps = _launch_config(n_cols)
    args = (
        dy2d,
        x2d,
        weight,
        rstd,
        dres2d if dres2d is not None else dy2d,
        dx,
        dw_partial,
        n_rows,
        n_cols,
        rows_per_program,
        dy2d.stride(0),
        x2d.stride(0),
        dres2d.stride(0) if dres2d is not None else 0,
        dx.stride(0),
    )
    constexprs = {"HAS_DRES": dres2d is not None, "BLOCK_N": block}
    return Launch(_rms_norm_bwd_kernel, (programs,), args, constexprs, num_warps), dx, dw_partial


def _backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dres2d: torch.Tensor | None,
    dx_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    launch, dx, dw_partial = _backward_launch(
        dy2d, x2d, weight, rstd, dres2d, dx_dtype, program_count(x2d.device)
    )
    launch()
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2d = _rows(x)
        weight = weight.contiguous()
        y, _, rstd = _forward(x2d, None, weight, eps, x.dtype)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(_rows(dy), x2d, weight, rstd, None, x2d.dtype)
        return dx.view(ctx.x_shape), dw, None


class _AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        ctx.set_materialize_grads(False)
        out_dtype = torch.result_type(x, residual)
        weight = weight.contiguous()
        y, summed, rstd = _forward(_rows(x), _rows(residual), weight, eps, out_dtype)
        ctx.save_for_backward(summed, weight, rstd)
        ctx.shape, ctx.x_dtype, ctx.res_dtype = x.shape, x.dtype, residual.dtype
        return y.view(x.shape), summed.view(x.shape)

    @staticmethod
    def backward(ctx, dy, d_new_residual):
        summed, weight, rstd = ctx.saved_tensors
        dres2d = _rows(d_new_residual) if d_new_residual is not None else None
        if dy is None:
            if dres2d is None:
                return None, None, None, None
            d_sum, dw = dres2d.to(summed.dtype), None
        else:
            d_sum, dw = _backward(_rows(dy), summed, weight, rstd, dres2d, summed.dtype)
        d_sum = d_sum.view(ctx.shape)
        # x + residual passes the same gradient to both inputs (as torch's add does).
        return d_sum.to(ctx.x_dtype), d_sum.to(ctx.res_dtype), dw, None


# --------------------------------------------------------------------------- public API


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")


def _use_kernels(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        kernels_available(x)
        and weight.device == x.device
        and x.numel() > 0
        and x.shape[-1] <= MAX_FUSED_COLS
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading dims); result has ``x``'s shape and dtype.

    Runs the Triton kernels when they can run on ``x`` (see ``kernels_available``),
    otherwise :func:`rms_norm_reference`. Differentiable wrt ``x`` and ``weight``.
    """
    _check_weight(x, weight)
    if not _use_kernels(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``new_residual = x + residual; y = rms_norm(new_residual, weight)``.

    Returns ``(y, new_residual)``, both of dtype ``torch.result_type(x, residual)``.
    ``x`` and ``residual`` must have the same shape. Differentiable wrt all three inputs.
    """
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    _check_weight(x, weight)
    if not (_use_kernels(x, weight) and residual.device == x.device):
        return add_rms_norm_reference(x, residual, weight, eps)
    return _AddRMSNormFunction.apply(x, residual, weight, eps)
