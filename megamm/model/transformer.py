"""The unified decoder-only transformer, read top to bottom:

    ids [B,S] -> TokenEmbedding -> Block x n_layers -> RMSNorm -> OutputHead

`model(ids)` returns logits [B,S,V]; `model(ids, targets)` returns a LossOutput.
The model is plain: no process groups. Build it on the meta device and call
`init_weights()` after materialising, or build it on a real device (initialised then).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamm.config import ModelConfig
from megamm.model.attention import DocumentLayout, choose_backend
from megamm.model.heads import LossOutput, OutputHead, TokenEmbedding
from megamm.model.layers import Block, RMSNorm
from megamm.vocab import Vocab


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, tp: int = 1, device=None):
        super().__init__()
        self.config = config
        self.vocab = Vocab(config.vocab, tp=tp)
        self.embed = TokenEmbedding(config, self.vocab, device=device)
        self.layers = nn.ModuleList(Block(config, device=device) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.kernels, device=device)
        self.head = OutputHead(config, self.vocab, device=device)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialise every parameter and buffer, e.g. after `to_empty()` from meta."""
        for m in self.modules():  # pre-order = construction order: same draws either way
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, ids, targets=None) -> torch.Tensor | LossOutput:
        """ids [B,S] int64. targets [B,S] (the next ids) -> LossOutput; else logits [B,S,V]."""
        h = self.embed(ids)
        backend = choose_backend(self.config.attention, h.device, h.dtype)
        layout = DocumentLayout.from_ids(ids, self.vocab.bos, backend)
        for block in self.layers:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, layout.positions, layout, use_reentrant=False)
            else:
                h = block(h, layout.positions, layout)
        h = self.norm(h)
        if targets is None:
            return self.head(h)
        return LossOutput(*self.head(h, targets, self.vocab.states(ids)))


def build_model(config: ModelConfig, device="cpu", tp: int = 1, seed: int | None = None) -> Transformer:
    """A model with initialised weights on `device` (deterministic given `seed`)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config, tp=tp, device="meta")
    model.to_empty(device=device)
    model.init_weights()
    return model
