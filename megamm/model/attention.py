"""Causal attention over packed rows: a token attends only to earlier tokens of its own
document, and RoPE positions restart at every document.

Documents are found from the ids alone: each `<bos>` starts one. `document_positions`
runs once per batch; its two tensors travel with the hidden states through every block
(and every pipeline stage), so nothing else has to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def document_positions(ids: torch.Tensor, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B,S] -> (positions [B,S] restarting at 0 at each <bos>, doc_ids [B,S]: the
    number of <bos> up to and including each position, 0 before the first)."""
    B, S = ids.shape
    pos = torch.arange(S, device=ids.device).expand(B, S)
    is_bos = ids == bos
    doc_ids = is_bos.long().cumsum(-1)
    start = torch.where(is_bos, pos, torch.zeros_like(pos)).cummax(-1).values
    return pos - start, doc_ids


def attend(q, k, v, doc_ids, backend: str = "sdpa"):
    """q [B,S,H,Dh], k/v [B,S,G,Dh] (G divides H), doc_ids [B,S] -> [B,S,H,Dh]."""
    if backend == "flash":
        return _flash(q, k, v, doc_ids)
    H, G = q.shape[2], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B,heads,S,Dh]
    if G != H:
        kt = kt.repeat_interleave(H // G, dim=1)
        vt = vt.repeat_interleave(H // G, dim=1)
    # more than one document in some row <=> its first and last doc ids differ
    if bool((doc_ids[:, -1] != doc_ids[:, 0]).any()):
        S = q.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B,S,S]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=(same_doc & causal)[:, None])
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return out.transpose(1, 2)


def _flash(q, k, v, doc_ids):
    from flash_attn import flash_attn_varlen_func

    B, S, H, Dh = q.shape
    # one sequence per (row, document): boundaries where the doc id changes
    flat_doc = (doc_ids + torch.arange(B, device=q.device)[:, None] * (S + 1)).reshape(-1)
    change = torch.ones_like(flat_doc, dtype=torch.bool)
    change[1:] = flat_doc[1:] != flat_doc[:-1]
    starts = torch.nonzero(change).flatten()
    cu = torch.cat([starts, torch.tensor([B * S], device=q.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(q.reshape(B * S, H, Dh), k.reshape(B * S, -1, Dh),
                                 v.reshape(B * S, -1, Dh), cu, cu, max_len, max_len, causal=True)
    return out.view(B, S, H, Dh)


def choose_backend(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve the config's `attention` field for tensors on `device` with `dtype`."""
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_installed()
    if setting == "flash":
        if not flash_ok:
            raise RuntimeError("attention='flash' needs flash-attn installed and fp16/bf16 CUDA tensors")
        return "flash"
    if setting == "auto" and flash_ok:
        return "flash"
    return "sdpa"
