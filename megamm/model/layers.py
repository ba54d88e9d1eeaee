"""The transformer block and its parts: RMSNorm, RoPE, GQA attention, SwiGLU.

Shapes: B batch, S sequence, D d_model, H query heads, G key/value heads, Dh head dim.
Every module can be built on the meta device; `reset_parameters()` fills its weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import megamm.kernels as K
from megamm.config import ModelConfig


# ---- kernel selection ---------------------------------------------------------------
# megamm.kernels holds both the Triton kernels and their torch references; the config's
# `kernels` field picks: "auto" = Triton where it can run, "torch" = the references,
# "triton" = Triton or a clear error.
def _use_triton(mode: str, x: torch.Tensor) -> bool:
    if mode == "torch":
        return False
    if K.kernels_available(x):
        return True
    if mode == "triton":
        raise RuntimeError("kernels='triton' but the Triton kernels cannot run here "
                           "(no CUDA device and TRITON_INTERPRET is not 1)")
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight, in fp32, cast back to x's dtype."""
    fn = K.rms_norm if _use_triton(mode, x) else K.rms_norm_reference
    return fn(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float, mode: str):
    """(rms_norm(x + residual), x + residual), fused on the Triton path."""
    fn = K.add_rms_norm if _use_triton(mode, x) else K.add_rms_norm_reference
    return fn(x, residual, weight, eps)


def apply_rope(q, k, positions, theta: float, mode: str):
    """Rotate q [B,S,H,Dh] and k [B,S,G,Dh] by per-token positions [B,S] (HF Llama
    half-rotation convention)."""
    fn = K.apply_rope if _use_triton(mode, q) else K.apply_rope_reference
    return fn(q, k, positions, theta)


# ---- modules -------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str = "auto", device=None):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.empty(dim, device=device))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, residual=None):
        """rms_norm(x); with residual: (rms_norm(x + residual), x + residual), fused.
        (The weight is used only inside forward, where ZeRO-3 has gathered it.)"""
        if residual is None:
            return rms_norm(x, self.weight, self.eps, self.kernels)
        return add_rms_norm(x, residual, self.weight, self.eps, self.kernels)


@torch.no_grad()
def init_normal_(param: torch.Tensor, std: float, truncate: bool = False) -> None:
    """Fill param from N(0, std^2) (truncated at 3 std), drawn in fp32 whatever param's
    dtype, so the random stream and values do not depend on the precision (a bf16
    parameter under deepspeed.zero.Init gets the same draws, rounded)."""
    w = param.new_empty(param.shape, dtype=torch.float32)  # not torch.empty: zero.Init recasts that
    if truncate:
        nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)
    else:
        nn.init.normal_(w, std=std)
    param.copy_(w)


class Linear(nn.Linear):
    """Bias-free nn.Linear that initialises itself from a truncated normal of `std`.

    Each leaf module initialises its own parameters inside its __init__, so that
    `deepspeed.zero.Init` (which partitions a module's parameters as soon as its
    __init__ returns) sees initialised values, and building on a device or on meta +
    init_weights() draws the same numbers in the same order.
    """

    def __init__(self, d_in: int, d_out: int, std: float, device=None):
        self.std = std
        super().__init__(d_in, d_out, bias=False, device=device)

    def reset_parameters(self):
        if self.weight.device.type != "meta":
            init_normal_(self.weight, self.std, truncate=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        d, hd, std = cfg.d_model, cfg.head_dim, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)  # residual-branch outputs start small
        self.q_proj = Linear(d, cfg.n_heads * hd, std, device=device)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, std, device=device)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, std, device=device)
        self.o_proj = Linear(cfg.n_heads * hd, d, out_std, device=device)

    def forward(self, x, positions, attn):
        """x [B,S,D]; positions [B,S]; attn: an AttentionMask for this batch."""
        B, S, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, S, cfg.n_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, S, cfg.n_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, S, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, k, positions, cfg.rope_theta, cfg.kernels)
        out = attn.attend(q, k, v)  # [B,S,H,Dh]
        return self.o_proj(out.reshape(B, S, cfg.n_heads * cfg.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.gate_proj = Linear(cfg.d_model, cfg.ffn_dim, std, device=device)
        self.up_proj = Linear(cfg.d_model, cfg.ffn_dim, std, device=device)
        self.down_proj = Linear(cfg.ffn_dim, cfg.d_model, out_std, device=device)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels, device=device)
        self.attn = Attention(cfg, device=device)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels, device=device)
        self.mlp = SwiGLU(cfg, device=device)

    def forward(self, x, positions, attn):
        h, x = self.mlp_norm(self.attn(self.attn_norm(x), positions, attn), residual=x)
        return x + self.mlp(h)
