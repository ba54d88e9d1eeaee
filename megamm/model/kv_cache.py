"""Key/value cache for incremental decoding.

One `LayerCache` per block holds the keys and values of every token seen so far,
for the key/value heads only (GQA: G heads, not H), preallocated to `max_len`:

    k, v     [B, max_len, G, Dh]
    doc_ids  [B, max_len]   (shared by all layers: the document each cached token is in)

`KVCache.extend(ids, bos)` appends a chunk of new ids [B, S_new] and returns their RoPE
positions and document ids, computed over the whole row so far exactly as
`document_positions` does for a full forward — so rows may be left-padded (pad tokens
sit in document 0, before the row's <bos>) and a query attends only to earlier tokens
of its own document. With the cache, `Transformer.forward(new_ids, cache=cache)`
gives the same logits as a full forward over the whole row (tests/model/test_kv_cache.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megamm.config import ModelConfig
from megamm.model.attention import document_positions


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.cfg, self.max_len = cfg, max_len
        self.ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.doc_ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.length = 0
        self.layers = [LayerCache(self, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, device)
                       for _ in range(cfg.n_layers)]

    def extend(self, ids: torch.Tensor, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ids [B, S_new]; -> (positions, doc_ids) [B, S_new] of the new tokens."""
        start, n = self.length, ids.shape[1]
        if start + n > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {start} cached + {n} new do not fit")
        self.ids[:, start:start + n] = ids
        positions, doc_ids = document_positions(self.ids[:, :start + n], bos)
        self.doc_ids[:, :start + n] = doc_ids
        self.length = start + n
        for layer in self.layers:
            layer.start = start
        return positions[:, start:], doc_ids[:, start:]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a LongTensor of row indices) — drop finished rows of a batch."""
        self.ids, self.doc_ids = self.ids[rows], self.doc_ids[rows]
        for layer in self.layers:
            layer.k, layer.v = layer.k[rows], layer.v[rows]


class LayerCache:
    def __init__(self, owner: KVCache, batch: int, max_len: int, n_kv: int, head_dim: int, dtype, device):
        self.owner = owner
        self.k = torch.zeros(batch, max_len, n_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.start = 0  # where the chunk being processed begins

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the chunk's k, v [B,S,G,Dh]; q [B,S,H,Dh] attends causally to its own
        document among all cached tokens -> [B,S,H,Dh]."""
        start, S = self.start, q.shape[1]
        end = start + S
        self.k[:, start:end] = k.to(self.k.dtype)
        self.v[:, start:end] = v.to(self.v.dtype)
        keys, values = self.k[:, :end], self.v[:, :end]
        H, G = q.shape[2], keys.shape[2]
        if G != H:
            keys = keys.repeat_interleave(H // G, dim=2)
            values = values.repeat_interleave(H // G, dim=2)
        docs = self.owner.doc_ids[:, :end]
        q_pos = torch.arange(start, end, device=q.device)
        k_pos = torch.arange(end, device=q.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None] & (docs[:, None, :] == docs[:, start:end, None])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype),
                                             values.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None])
        return out.transpose(1, 2)
