"""Input embedding (token table + one learned vector per modality) and the output head
whose rows are grouped per modality, with the loss under the modality grammar.

The loss lives inside `OutputHead.forward` so that, under ZeRO-3, the head weight is
gathered exactly while it is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamm.config import ModelConfig
from megamm.model.layers import init_normal_
from megamm.vocab import MODALITY_NAMES, Vocab


class TokenEmbedding(nn.Module):
    """ids [B,S] -> table[ids] + modality_vector[modality(ids)]   [B,S,D]"""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, device=None):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.weight = nn.Parameter(torch.empty(vocab.size, cfg.d_model, device=device))
        self.modality = nn.Parameter(torch.empty(len(MODALITY_NAMES), cfg.d_model, device=device))
        self.register_buffer("modality_of_id", vocab.modality_table().to(device), persistent=False)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        init_normal_(self.weight, self.cfg.init_std)
        nn.init.zeros_(self.modality)
        self.modality_of_id = self.vocab.modality_table().to(self.weight.device)

    def forward(self, ids):
        return F.embedding(ids, self.weight) + F.embedding(self.modality_of_id[ids], self.modality)

    def folded_table(self) -> torch.Tensor:
        """[V,D] table with the modality vectors added in: a plain embedding for export."""
        return self.weight + self.modality[self.modality_of_id]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: mean cross-entropy (+ z-loss) over counted targets
    modality_sum: torch.Tensor  # [4] summed cross-entropy per target modality (detached)
    modality_count: torch.Tensor  # [4] counted targets per modality

    def modality_losses(self) -> dict[str, float]:
        """Mean loss per modality that had targets (call after any cross-rank sum)."""
        return {name: float(self.modality_sum[i] / self.modality_count[i])
                for i, name in enumerate(MODALITY_NAMES) if self.modality_count[i] > 0}


class OutputHead(nn.Module):
    """Final hidden [B,S,D] -> logits [B,S,V]; with targets, the loss.

    Rows are grouped per modality exactly as the vocabulary is, so the image head is
    `weight[image_start:audio_start]`. With loss_scope "modality" each position's
    softmax runs only over the id ranges its grammar state allows.
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocab, device=None):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.weight = nn.Parameter(torch.empty(vocab.size, cfg.d_model, device=device))
        self._ranges = [vocab.allowed_ranges(s) for s in range(vocab.n_states)]
        self.register_buffer("column_table", vocab.column_table().to(device), persistent=False)
        self.register_buffer("modality_of_id", vocab.modality_table().to(device), persistent=False)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        init_normal_(self.weight, self.cfg.init_std)
        self.column_table = self.vocab.column_table().to(self.weight.device)
        self.modality_of_id = self.vocab.modality_table().to(self.weight.device)

    def forward(self, h, targets=None, states=None):
        """Logits [B,S,V], or with targets the tuple (loss, modality_sum, modality_count).

        A plain tuple, not LossOutput: ZeRO-3 finds the tensors of a module's output to
        hook its backward (and re-gather this weight) and does not look inside dataclasses.
        """
        if targets is None:
            return F.linear(h, self.weight)
        out = self.loss(h, targets, states)
        return out.loss, out.modality_sum, out.modality_count

    def loss(self, h, targets, states) -> LossOutput:
        """h [B,S,D], targets [B,S] (next ids), states [B,S] (grammar state of each input)."""
        h, targets, states = h.reshape(-1, h.shape[-1]), targets.reshape(-1), states.reshape(-1)
        grammar = self.cfg.loss_scope == "modality"
        counted = self.vocab.counted_targets(states, targets, grammar, self.column_table)
        ce = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        z = torch.zeros_like(ce)
        if not grammar:  # loss_scope "full"
            logits = F.linear(h, self.weight).float()
            lse = torch.logsumexp(logits, -1)
            ce = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
            z = lse
        else:
            cols = self.column_table[states, targets]  # -1 (not counted): the grammar forbids it
            for s, ranges in enumerate(self._ranges):
                idx = torch.nonzero(counted & (states == s)).flatten()
                if idx.numel() == 0:
                    continue
                hs = h[idx]
                logits = torch.cat([F.linear(hs, self.weight[lo:hi]) for lo, hi in ranges], -1).float()
                lse = torch.logsumexp(logits, -1)
                ce_s = lse - logits.gather(-1, cols[idx, None]).squeeze(-1)
                ce = ce.index_put((idx,), ce_s)
                z = z.index_put((idx,), lse)
        w = counted.float()
        n = w.sum().clamp(min=1)
        loss = (ce * w).sum() / n
        if self.cfg.z_loss > 0:
            loss = loss + self.cfg.z_loss * (z.pow(2) * w).sum() / n
        mod = self.modality_of_id[targets]
        msum = torch.zeros(len(MODALITY_NAMES), device=h.device).index_add(0, mod, (ce * w).detach())
        mcount = torch.zeros(len(MODALITY_NAMES), device=h.device).index_add(0, mod, w)
        return LossOutput(loss=loss, modality_sum=msum, modality_count=mcount)
