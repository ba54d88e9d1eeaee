"""The unified decoder-only transformer, read top to bottom:

    ids [B,S] -> TokenEmbedding -> Block x n_layers -> RMSNorm -> OutputHead

`model(ids)` returns logits [B,S,V]; `model(ids, targets)` returns a LossOutput.
The stages pass tensors only — hidden states [B,S,D] plus positions and document ids
[B,S], computed once from the ids — so megamm.parallel can cut the same modules into
deepspeed.pipe stages, shard them for tensor parallelism and wrap blocks in activation
checkpointing from outside. No process groups here. Build on the meta device, then
`materialize()` (megamm.model.init), or use `build_model`.
"""
from __future__ import annotations

import torch
from torch import nn

from megamm.config import ModelConfig
from megamm.model.attention import document_positions
from megamm.model.heads import LossOutput, OutputHead, TokenEmbedding
from megamm.model.init import init_weights, materialize
from megamm.model.layers import Block, RMSNorm
from megamm.vocab import Vocab


def stage_paths(n_layers: int) -> list[str]:
    """The model's modules in forward order, by their path in Transformer: pipeline layer i
    (megamm.parallel.pipeline) is the module at stage_paths(n_layers)[i]."""
    return ["embed"] + [f"layers.{i}" for i in range(n_layers)] + ["norm", "head"]


def stream_tensors(vocab: Vocab, ids: torch.Tensor, targets: torch.Tensor | None, loss_scope: str):
    """What every stage needs besides the hidden states, computed once from ids [B,S]:
    (positions, doc_ids, grammar states, loss targets), each [B,S]; the last two are None
    without targets. The plain model's forward and the pipeline's first stage share it."""
    positions, doc_ids = document_positions(ids, vocab.bos)
    if targets is None:
        return positions, doc_ids, None, None
    return positions, doc_ids, vocab.states(ids), vocab.loss_targets(ids, targets, loss_scope)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        self.vocab = Vocab(config.vocab)
        self.embed = TokenEmbedding(config, self.vocab, device=device)
        self.layers = nn.ModuleList(Block(config, device=device) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.kernels, device=device)
        self.head = OutputHead(config, self.vocab, device=device)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_weights(self, seed: int) -> None:
        init_weights(self, seed)

    def forward(self, ids, targets=None, cache=None) -> torch.Tensor | LossOutput:
        """ids [B,S] int64. targets [B,S] (the next ids) -> LossOutput; else logits [B,S,V].
        With `cache` (megamm.model.kv_cache.KVCache), ids are the tokens that follow the
        cached ones and the logits are theirs (incremental decoding)."""
        states = None
        if cache is not None:
            positions, doc_ids = cache.extend(ids, self.vocab.bos)
        else:
            positions, doc_ids, states, targets = stream_tensors(self.vocab, ids, targets, self.config.loss_scope)
        h = self.embed(ids)
        for i, block in enumerate(self.layers):
            h = block(h, positions, doc_ids, None if cache is None else cache.layers[i])
        h = self.norm(h)
        if targets is None:
            return self.head(h)
        if states is None:  # targets with a cache
            _, _, states, targets = stream_tensors(self.vocab, ids, targets, self.config.loss_scope)
        return LossOutput.from_head(*self.head(h, states, targets))


def build_model(config: ModelConfig, device="cpu", seed: int = 0) -> Transformer:
    """A plain single-process model with initialised weights on `device`."""
    with torch.device("meta"):
        model = Transformer(config, device="meta")
    return materialize(model, device, seed)
