"""Input embedding (token table + one learned vector per modality) and the output head
whose rows are grouped per modality (the image head is the image block of rows).

The head's forward computes the loss (megamm.model.loss) when given targets, so that
under ZeRO-3 its weight is gathered exactly while it is used. Both tables may hold a
contiguous shard of the vocabulary's rows: `vocab_start` says where it begins
(megamm.parallel sets it; a plain model holds every row from 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamm.config import ModelConfig
from megamm.model.layers import normal_
from megamm.model.loss import DEFAULT_CHUNKING, GrammarTables, HeadChunking, grammar_loss
from megamm.vocab import MODALITY_NAMES, Vocab


class TokenEmbedding(nn.Module):
    """ids [B,S] -> table[ids] + modality_vector[modality(ids)]   [B,S,D]"""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, device=None):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.tables = GrammarTables(vocab)
        self.weight = nn.Parameter(torch.empty(vocab.size, cfg.d_model, device=device))
        self.modality = nn.Parameter(torch.zeros(len(MODALITY_NAMES), cfg.d_model, device=device))

    def init_full(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        if name == "weight":
            normal_(full, self.cfg.init_std, generator)
        else:  # modality vectors start at zero
            full.zero_()

    def modality_vectors(self, ids):
        """ids [B,S] -> the modality vector of each id [B,S,D]."""
        return F.embedding(self.tables.get(ids.device)[1][ids], self.modality)

    def forward(self, ids):
        return F.embedding(ids, self.weight) + self.modality_vectors(ids)

    def folded_table(self) -> torch.Tensor:
        """[V,D] table with the modality vectors added in: a plain embedding for export."""
        return self.weight + self.modality[self.tables.get(self.weight.device)[1]]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: mean cross-entropy (+ z-loss) over counted targets
    loss_sum: torch.Tensor  # scalar: the same, summed instead of averaged
    modality_sum: torch.Tensor  # [4] summed cross-entropy per target modality (detached)
    modality_count: torch.Tensor  # [4] counted targets per modality
    row_stats: torch.Tensor | None = None  # [2, B] per row: summed cross-entropy, counted targets

    @classmethod
    def from_head(cls, loss_sum: torch.Tensor, stats: torch.Tensor,
                  row_stats: torch.Tensor | None = None) -> "LossOutput":
        m = len(MODALITY_NAMES)
        return cls(loss=loss_sum / stats[m:].sum().clamp(min=1), loss_sum=loss_sum,
                   modality_sum=stats[:m], modality_count=stats[m:], row_stats=row_stats)

    def modality_losses(self) -> dict[str, float]:
        """Mean loss per modality that had targets (call after any cross-rank sum)."""
        return {name: float(self.modality_sum[i] / self.modality_count[i])
                for i, name in enumerate(MODALITY_NAMES) if self.modality_count[i] > 0}


class OutputHead(nn.Module):
    """Final hidden [B,S,D] -> logits [B,S,V]; with states and targets, the loss as the
    plain tuple (loss_sum, stats) of megamm.model.loss.grammar_loss, (loss_sum, stats,
    row_stats) when `row_stats` is on.

    A tuple, not a dataclass: ZeRO-3 finds the tensors of a module's output to hook its
    backward (and re-gather this weight) and does not look inside dataclasses.
    """

    vocab_start = 0  # first vocabulary row held here
    group = None  # process group over which the rows are split (None: all rows here)
    chunking: HeadChunking = DEFAULT_CHUNKING  # how the loss cuts its rows and columns
    row_stats = False  # also return each row's loss statistics (set by Trainer.report_rows)

    def __init__(self, cfg: ModelConfig, vocab: Vocab, device=None):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.tables = GrammarTables(vocab)
        self.weight = nn.Parameter(torch.empty(vocab.size, cfg.d_model, device=device))

    def init_full(self, name: str, full: torch.Tensor, generator: torch.Generator) -> None:
        normal_(full, self.cfg.init_std, generator)

    def forward(self, h, states=None, targets=None):
        if targets is None:
            return F.linear(h, self.weight)
        return grammar_loss(h, self.weight, self.vocab_start, states, targets, self.tables,
                            self.cfg.loss_scope, self.cfg.z_loss, self.group, self.chunking, self.row_stats)
