"""The training loss: cross-entropy under the modality grammar, over the head's rows.

    h [N,D], head rows [Vs,D] = ids [start, start+Vs) of the vocabulary
    -> logits [N,Vs] -> per-token (ce, lse) -> loss_sum and per-modality statistics

With loss_scope "modality", position i's softmax runs only over the ids its grammar
state allows next (column masks from `Vocab.allowed_table`, sliced to the shard), which
is exactly what sampling allows; "full" keeps the plain softmax over every row.

The same code serves the single process (the shard is the whole table, no group) and
vocabulary-parallel tensor parallelism (each rank holds a contiguous row range, `group`
is the tensor-parallel group): the row max, the sum of exponentials and the target
logit are all-reduced over the group, so no rank ever holds full-vocabulary logits.
The backward is local: d ce / d logits = softmax - onehot on the rank's own columns.
Without a group the whole table is here and torch's fused F.cross_entropy does the same
(measured on the CPU, bf16, plain softmax over 2048 tokens x 45,056 ids, forward +
backward with the head's matmuls: 1.21 s against 1.41 s).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamm.vocab import MODALITY_NAMES, Vocab

N_STATS = 2 * len(MODALITY_NAMES)  # per-modality summed cross-entropy, then counts


class _ShardedCrossEntropy(torch.autograd.Function):
    """(logits [N,Vs] fp32, bias [N,Vs] 0/-inf or None, target column [N] or -1 when the
    target is outside this shard, group) -> (ce [N], lse [N]) over the whole vocabulary."""

    @staticmethod
    def forward(ctx, logits, bias, target_col, group):
        in_shard = target_col >= 0
        # the target's raw logit: finite even where the grammar forbids the target (such
        # positions are not counted, and a -inf here would turn their zero weight into NaN)
        tlogit = torch.where(in_shard, logits.gather(-1, target_col.clamp(min=0)[:, None]).squeeze(-1),
                             torch.zeros(logits.shape[0], device=logits.device))
        if bias is not None:
            logits = logits + bias
        m = logits.max(-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with nothing allowed
        exp = torch.exp(logits - m[:, None])
        sumexp = exp.sum(-1)
        if group is not None:
            dist.all_reduce(sumexp, group=group)
            dist.all_reduce(tlogit, group=group)
        lse = m + torch.log(sumexp)
        ctx.save_for_backward(exp, sumexp, target_col)
        return lse - tlogit, lse

    @staticmethod
    def backward(ctx, grad_ce, grad_lse):
        exp, sumexp, target_col = ctx.saved_tensors
        softmax = exp / sumexp[:, None]
        grad = softmax * (grad_ce + grad_lse)[:, None]
        in_shard = target_col >= 0
        rows = torch.nonzero(in_shard).flatten()
        grad[rows, target_col[rows]] -= grad_ce[rows]
        return grad, None, None, None


FORBIDDEN = -1e30
"""The logit bias of an id the grammar forbids, on the one-table path: exp(-1e30 - max) is
exactly 0 in fp32, so the softmax is the masked one, and unlike -inf it keeps a row whose
state allows nothing (no state does today; such a row is never counted) free of NaN."""


def _whole_table_cross_entropy(logits, bias, targets, counted, want_lse: bool):
    """The one-table case of _ShardedCrossEntropy with torch's fused softmax cross-entropy
    (log_softmax + nll: fewer passes over the [N,V] logits than the sharded Function):
    (ce [N], 0 where not counted; lse [N] or None)."""
    if bias is not None:
        logits = logits + bias
    ce = F.cross_entropy(logits, torch.where(counted, targets, torch.full_like(targets, -100)),
                         ignore_index=-100, reduction="none")
    return ce, (torch.logsumexp(logits, -1) if want_lse else None)


class GrammarTables:
    """Per-device lookup tables of a vocabulary (cached; never part of a state dict)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed [n_states, V] bool, modality_of_id [V] int64) on device."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.vocab.allowed_table().to(device),
                                self.vocab.modality_table().to(device))
        return self._cache[key]


def grammar_loss(h, weight, vocab_start: int, states, targets, tables: GrammarTables,
                 loss_scope: str = "modality", z_loss: float = 0.0, group=None):
    """h [B,S,D] or [N,D]; weight [Vs,D] holding vocabulary rows [vocab_start, +Vs);
    states, targets [B,S] or [N]. Returns (loss_sum, stats):

    loss_sum: scalar, the summed cross-entropy (+ z_loss x lse^2) of the counted targets;
    stats [N_STATS] fp32, detached: per-modality summed cross-entropy, then counts.
    A target counts unless it is <pad>, after a document's end, or (modality scope)
    forbidden by its position's grammar state.
    """
    h, states, targets = h.reshape(-1, h.shape[-1]), states.reshape(-1), targets.reshape(-1)
    allowed, modality_of_id = tables.get(h.device)
    vs = weight.shape[0]
    grammar = loss_scope != "full"  # "target" has dropped its prompt targets already
    counted = tables.vocab.counted_targets(states, targets, grammar, allowed)
    bias = None
    if grammar:
        shard_allowed = allowed[:, vocab_start: vocab_start + vs]  # [n_states, Vs]
        # sharded: -inf (its forward copes with rows where nothing is allowed); one table:
        # FORBIDDEN, finite, so such rows stay finite through log_softmax
        forbidden = float("-inf") if group is not None else FORBIDDEN
        bias = torch.zeros(shard_allowed.shape, device=h.device).masked_fill_(~shard_allowed, forbidden)
        bias = bias[states]  # [N,Vs]
    logits = F.linear(h, weight).float()  # [N,Vs]
    if group is None:
        ce, lse = _whole_table_cross_entropy(logits, bias, targets, counted, z_loss > 0)
    else:
        local = targets - vocab_start
        target_col = torch.where((local >= 0) & (local < vs), local, torch.full_like(local, -1))
        ce, lse = _ShardedCrossEntropy.apply(logits, bias, target_col, group)
    w = counted.float()
    loss_sum = (ce * w).sum()
    if z_loss > 0:
        loss_sum = loss_sum + z_loss * (lse.pow(2) * w).sum()
    mod = modality_of_id[targets]
    n_mod = len(MODALITY_NAMES)
    msum = torch.zeros(n_mod, device=h.device).index_add(0, mod, (ce * w).detach())
    mcount = torch.zeros(n_mod, device=h.device).index_add(0, mod, w)
    return loss_sum, torch.cat([msum, mcount])
