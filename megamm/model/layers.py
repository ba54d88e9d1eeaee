"""The transformer block and its parts: RMSNorm, RoPE, GQA attention, SwiGLU.

Shapes: B batch, S sequence, D d_model, H query heads, G key/value heads, Dh head dim.
Every module can be built on the meta device; megamm.model.init fills its weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import megamm.kernels as K
from megamm.config import ModelConfig
from megamm.model.attention import attend, choose_backend


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
# Each leaf module with parameters says how to fill the FULL (unsharded) tensor of each
# of its parameters (`init_full`); megamm.model.init draws it from a generator keyed by
# the parameter's name and keeps the local shard, so every layout starts from the
# single-process weights.
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str = "auto", device=None):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def init_full(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        full.fill_(1.0)

    def forward(self, x, residual=None):
        """rms_norm(x); with residual: (rms_norm(x + residual), x + residual), fused.
        (The weight is used only inside forward, where ZeRO-3 has gathered it.)"""
        if residual is None:
            return rms_norm(x, self.weight, self.eps, self.kernels)
        return add_rms_norm(x, residual, self.weight, self.eps, self.kernels)


def normal_(full: torch.Tensor, std: float, generator: torch.Generator, truncate: bool = False) -> None:
    """Fill an fp32 tensor from N(0, std^2) (truncated at 3 std when asked)."""
    if truncate:
        nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
    else:
        nn.init.normal_(full, mean=0.0, std=std, generator=generator)


class Linear(nn.Linear):
    """Bias-free nn.Linear initialised from a truncated normal of `std`."""

    def __init__(self, d_in: int, d_out: int, std: float, device=None):
        self.std = std
        super().__init__(d_in, d_out, bias=False, device=device)

    def reset_parameters(self):  # nn.Linear's own init is replaced by init_full
        pass

    def init_full(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        normal_(full, self.std, generator, truncate=True)


class Attention(nn.Module):
    """GQA self-attention. Head counts are read from the projections' shapes, so the
    same module runs a tensor-parallel shard (whole kv groups per rank) unchanged."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        d, hd, std = cfg.d_model, cfg.head_dim, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)  # residual-branch outputs start small
        self.q_proj = Linear(d, cfg.n_heads * hd, std, device=device)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, std, device=device)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, std, device=device)
        self.o_proj = Linear(cfg.n_heads * hd, d, out_std, device=device)

    def forward(self, x, positions, doc_ids, cache=None):
        """x [B,S,D]; positions, doc_ids [B,S] (from megamm.model.attention.document_positions).
        With `cache` (a megamm.model.kv_cache.LayerCache) x holds only the new tokens:
        their keys/values are appended and they attend to everything cached before."""
        B, S, _ = x.shape
        hd, cfg = self.cfg.head_dim, self.cfg
        q = self.q_proj(x).view(B, S, -1, hd)  # [B,S,H_local,Dh]
        k = self.k_proj(x).view(B, S, -1, hd)  # [B,S,G_local,Dh]
        v = self.v_proj(x).view(B, S, -1, hd)
        q, k = apply_rope(q, k, positions, cfg.rope_theta, cfg.kernels)
        if cache is not None:
            out = cache.attend(q, k, v)
        else:
            backend = choose_backend(cfg.attention, x.device, x.dtype)
            out = attend(q, k, v, doc_ids, backend)  # [B,S,H_local,Dh]
        return self.o_proj(out.reshape(B, S, -1))


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

    def forward(self, x, positions, doc_ids, cache=None):
        """x [B,S,D] -> [B,S,D]; positions, doc_ids [B,S] locate each token in its document;
        `cache`: this layer's KV cache when decoding (see Attention.forward)."""
        h, x = self.mlp_norm(self.attn(self.attn_norm(x), positions, doc_ids, cache), residual=x)
        return x + self.mlp(h)
