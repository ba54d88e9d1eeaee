"""Causal attention over packed rows: a token attends only to earlier tokens of its own
document, and RoPE positions restart at every document.

Documents are found from the ids alone: each `<bos>` starts one. `document_positions`
runs once per batch; its two tensors travel with the hidden states through every block
(and every pipeline stage), so nothing else has to.

Backends: flash-attn's variable-length kernel (CUDA, 16-bit) runs each document on its
own. The torch SDPA path does the same by packing: the batch's documents are gathered
into rows of their own, bucketed by length, and attended with is_causal, so no work goes
to pairs of tokens from different documents (on the CPU, SDPA costs as much with a
document mask as without one). When packing would save little (one long document per
row) it falls back to one SDPA call over the rows with a document x causal mask.
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


PACK_BELOW = 0.7
"""The sdpa path packs a batch's documents into rows of their own (`_segments`) when that
leaves at most this share of the dense path's attention work (sum over buckets of
n x L^2 against B x S^2); otherwise it runs one masked attention over the packed rows."""

BUCKET_RATIO = 0.7
"""A segment joins the current length bucket while it is at least this share of the
bucket's longest one (so padding at most doubles a bucket's work)."""

_segments_cache: list = [None, -1, None]  # (doc_ids tensor, its version, _segments' answer)


def _segment_starts(doc_ids):
    """doc_ids [B,S] -> (change [B*S] bool, starts [n]): the flattened positions where a
    segment (a run of one document inside one row) begins; every row starts one."""
    B, S = doc_ids.shape
    flat = (doc_ids + torch.arange(B, device=doc_ids.device)[:, None] * (S + 1)).reshape(-1)
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    return change, torch.nonzero(change).flatten()


def _segments(doc_ids):
    """doc_ids [B,S] -> None when every row holds one document or packing saves too little
    (PACK_BELOW), else (index [T], inverse [B*S], buckets [(n, L)]): the batch's segments
    (runs of one document inside a row), sorted by length and grouped into buckets of n
    rows of L slots (L the bucket's longest segment), T = sum of n x L slots.
    `index` takes each slot from the flattened [B*S] positions (a segment's unused slots
    repeat position 0: they sit after its real tokens, where no causal query looks);
    `inverse` takes each position back from the slots. Every layer of a forward gets the
    same doc_ids tensor, so the answer is computed once per batch."""
    if _segments_cache[0] is doc_ids and _segments_cache[1] == doc_ids._version:
        return _segments_cache[2]
    B, S = doc_ids.shape
    dev = doc_ids.device
    change, starts = _segment_starts(doc_ids)
    lengths = torch.diff(starts, append=torch.tensor([B * S], device=dev)).tolist()
    out = None
    if len(lengths) > B:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        slot_start = [0] * len(lengths)
        buckets, at = [], 0
        for i in order:
            if not buckets or lengths[i] < BUCKET_RATIO * buckets[-1][1]:
                buckets.append([0, lengths[i]])
            n, L = buckets[-1]
            slot_start[i] = at
            at += L
            buckets[-1][0] = n + 1
        work = sum(n * L * L for n, L in buckets)
        if work <= PACK_BELOW * B * S * S:
            seg = change.long().cumsum(0) - 1
            pos = torch.arange(B * S, device=dev)
            inverse = torch.tensor(slot_start, device=dev)[seg] + (pos - starts[seg])
            index = torch.zeros(at, dtype=torch.long, device=dev).index_copy_(0, inverse, pos)
            out = (index, inverse, [tuple(b) for b in buckets])
    _segments_cache[:] = [doc_ids, doc_ids._version, out]
    return out


class _ToSlots(torch.autograd.Function):
    """x [B*S, ...] -> x[index] [T, ...], the packed slots; the gradient goes back with a
    gather (grad[inverse]) instead of index_select's scatter-add (slow on the CPU in bf16;
    commit 0988e1c has the profile).
    Exact because every position fills exactly one real slot and the padding slots' gradient
    is zero: their outputs are dropped (`_FromSlots`) and, sitting after their segment's real
    tokens, no causal query attends to them."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _FromSlots(torch.autograd.Function):
    """y [T, ...] slots -> y[inverse] [B*S, ...]; the gradient is copied into the real slots
    (padding slots get zero), not scatter-added (every slot is taken at most once)."""

    @staticmethod
    def forward(ctx, y, inverse):
        ctx.save_for_backward(inverse)
        ctx.slots = y.shape[0]
        return y.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.new_zeros((ctx.slots, *grad.shape[1:])).index_copy_(0, inverse, grad), None


def _expand_kv(kt, vt, H):
    """[rows,G,len,Dh] keys/values -> [rows,H,len,Dh] (each of the G groups serves H/G heads)."""
    G = kt.shape[1]
    if G == H:
        return kt, vt
    return kt.repeat_interleave(H // G, dim=1), vt.repeat_interleave(H // G, dim=1)


def attend(q, k, v, doc_ids, backend: str = "sdpa"):
    """q [B,S,H,Dh], k/v [B,S,G,Dh] (G divides H), doc_ids [B,S] -> [B,S,H,Dh]."""
    if backend == "flash":
        return _flash(q, k, v, doc_ids)
    B, S, H, Dh = q.shape
    packed = _segments(doc_ids)
    if packed is not None:  # each document in a row of its own: no cross-document work
        index, inverse, buckets = packed
        qs, ks, vs = (_ToSlots.apply(t.reshape(B * S, -1, Dh), index, inverse) for t in (q, k, v))
        outs, at = [], 0
        for n, L in buckets:
            qb, kb, vb = (t[at: at + n * L].view(n, L, -1, Dh).transpose(1, 2) for t in (qs, ks, vs))
            kb, vb = _expand_kv(kb, vb, H)
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True).transpose(1, 2).reshape(n * L, H, Dh))
            at += n * L
        return _FromSlots.apply(torch.cat(outs), inverse).view(B, S, H, Dh)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B,heads,S,Dh]
    kt, vt = _expand_kv(kt, vt, H)
    # more than one document in some row <=> its first and last doc ids differ
    if bool((doc_ids[:, -1] != doc_ids[:, 0]).any()):
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B,S,S]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=(same_doc & causal)[:, None])
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return out.transpose(1, 2)


def _flash(q, k, v, doc_ids):
    from flash_attn import flash_attn_varlen_func

    B, S, H, Dh = q.shape
    # one sequence per (row, document)
    _, starts = _segment_starts(doc_ids)
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
