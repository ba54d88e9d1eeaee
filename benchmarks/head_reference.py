"""The grammar loss head as it was before the chunked head (megamm commit 43e14d9,
megamm/model/loss.py), kept verbatim below this docstring: the reference that
tests/model/test_chunked_head.py compares the chunked head with, and the "before" of
benchmarks/head_memory.py.

`_SpanHeadCrossEntropy` keeps every group's fp32 log-softmax until backward and the
tensor-parallel path builds full [N, Vs] logits and an [N, Vs] bias: memory that grows
with tokens x vocabulary, which is what megamm.model.loss no longer does.
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
"""The logit bias of an id the grammar forbids inside a column span the one-table head
computes (`GrammarTables.spans`): exp(-1e30 - max) is exactly 0 in fp32, so the softmax
over the span is the one over the state's allowed ids."""


def _pad_rows(t, multiple: int = 16):
    """t [n, k] with zero rows appended up to a multiple of 16. CPU GEMMs whose output has a
    handful of rows (5-11 seen) round differently with the thread count; a state's group can
    be that small, and launchers that pick different thread counts must train the same curve."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


class _SpanHeadCrossEntropy(torch.autograd.Function):
    """The one-table head, fused: for each group of rows (one grammar state, or every
    counted row under the plain softmax), logits over only the columns the group may
    produce, then cross-entropy. A column span is a slice of the table (no copy) with a
    FORBIDDEN bias on the few ids inside it the state forbids, or the state's allowed rows
    gathered (`ids`). The full-vocabulary softmax of a row whose forbidden ids carry -inf
    is exactly the softmax over its allowed ids, so this equals the masked loss over the
    whole table while computing, for an image position, only the image codebook's logits.

    (h [N,D], weight [V,D], groups [(rows [n], lo, hi, ids [k] or None, bias [hi-lo] or
    None)], targets [N]) -> (ce [N], lse [N]) fp32, 0 on rows in no group. Every target of
    a group's rows must be one of its columns (counted targets are). The matmuls run in
    h's dtype, the softmax in fp32, as F.linear(h, weight).float() would. Backward runs once.
    """

    @staticmethod
    def forward(ctx, h, weight, groups, targets):
        ce = torch.zeros(h.shape[0], device=h.device)
        lse = torch.zeros(h.shape[0], device=h.device)
        saved, plan = [], []
        for rows, lo, hi, ids, bias in groups:
            w = weight[lo:hi] if ids is None else weight.index_select(0, ids)
            logits = F.linear(_pad_rows(h.index_select(0, rows)), w)[: rows.numel()].float()  # [n, columns]
            if bias is not None:
                logits += bias
            t = targets.index_select(0, rows)
            col = (t - lo) if ids is None else torch.searchsorted(ids, t)
            logp = torch.log_softmax(logits, -1)  # one fused pass; logp = logits - lse
            target_logp = logp.gather(1, col[:, None]).squeeze(1)
            ce.index_copy_(0, rows, -target_logp)
            lse.index_copy_(0, rows, logits.gather(1, col[:, None]).squeeze(1) - target_logp)
            saved += [rows, col, logp]
            plan.append((lo, hi, ids))
        ctx.plan, ctx.done = plan, False
        ctx.save_for_backward(h, weight, *saved)
        return ce, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, grad_lse):
        if ctx.done:
            raise RuntimeError("the grammar head's backward runs once (it reuses its saved softmax)")
        ctx.done = True
        h, weight, *saved = ctx.saved_tensors
        grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(weight)
        for g, (lo, hi, ids) in enumerate(ctx.plan):
            rows, col, p = saved[3 * g: 3 * g + 3]
            gce = grad_ce.index_select(0, rows)
            # d(ce) = softmax - onehot(target), d(lse) = softmax; the softmax in place of logp
            p.exp_().mul_((gce + grad_lse.index_select(0, rows))[:, None])
            p.scatter_add_(1, col[:, None], -gce[:, None])
            p, hr, n = _pad_rows(p.to(h.dtype)), _pad_rows(h.index_select(0, rows)), rows.numel()
            gw = (hr.t() @ p).t()  # [columns, D], computed with D (not the column count) as rows
            if ids is None:
                grad_h.index_copy_(0, rows, (p @ weight[lo:hi])[:n])
                grad_w[lo:hi] += gw
            else:
                grad_h.index_copy_(0, rows, (p @ weight.index_select(0, ids))[:n])
                grad_w.index_add_(0, ids, gw)
        return grad_h, grad_w, None, None


class GrammarTables:
    """Per-device lookup tables of a vocabulary (cached; never part of a state dict)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._spans: dict[str, list] = {}

    def get(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed [n_states, V] bool, modality_of_id [V] int64) on device."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.vocab.allowed_table().to(device),
                                self.vocab.modality_table().to(device))
        return self._cache[key]

    def spans(self, device) -> list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]:
        """Per grammar state, the columns the one-table head computes: (lo, hi, ids, bias).
        One allowed range: the slice [lo, hi). Several (text + <eot>; audio codebook 0 +
        <eoa>): the slice from the first to the last with a FORBIDDEN bias on the ids
        between them when those are few, else the allowed ids themselves (`ids`, sorted)."""
        key = str(device)
        if key not in self._spans:
            out = []
            for s in range(self.vocab.n_states):
                ranges = self.vocab.allowed_ranges(s)
                lo, hi = ranges[0][0], ranges[-1][1]
                allowed = sum(b - a for a, b in ranges)
                if len(ranges) == 1:
                    out.append((lo, hi, None, None))
                elif (hi - lo) - allowed <= max(64, allowed // 8):
                    bias = torch.full((hi - lo,), FORBIDDEN)
                    for a, b in ranges:
                        bias[a - lo: b - lo] = 0.0
                    out.append((lo, hi, None, bias.to(device)))
                else:
                    ids = torch.cat([torch.arange(a, b) for a, b in ranges])
                    out.append((lo, hi, ids.to(device), None))
            self._spans[key] = out
        return self._spans[key]

    def groups(self, states, counted, grammar: bool) -> list:
        """The counted rows split for _SpanHeadCrossEntropy: one group per grammar state
        present (grammar) or one group over the whole table. One host synchronisation."""
        n_keys = self.vocab.n_states if grammar else 1
        key = torch.where(counted, states if grammar else torch.zeros_like(states),
                          torch.full_like(states, n_keys))
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=n_keys + 1).tolist()
        spans = self.spans(states.device) if grammar else [(0, self.vocab.size, None, None)]
        out, at = [], 0
        for k in range(n_keys):
            if counts[k]:
                out.append((order[at: at + counts[k]], *spans[k]))
            at += counts[k]
        return out


def grammar_loss(h, weight, vocab_start: int, states, targets, tables: GrammarTables,
                 loss_scope: str = "modality", z_loss: float = 0.0, group=None):
    """h [B,S,D] or [N,D]; weight [Vs,D] holding vocabulary rows [vocab_start, +Vs);
    states, targets [B,S] or [N]. Returns (loss_sum, stats):

    loss_sum: scalar, the summed cross-entropy (+ z_loss x lse^2) of the counted targets;
    stats [N_STATS] fp32, detached: per-modality summed cross-entropy, then counts.
    A target counts unless it is <pad>, after a document's end, or (modality scope)
    forbidden by its position's grammar state.

    Without a group (the whole table here) only counted rows are computed, each over the
    columns its state allows (_SpanHeadCrossEntropy); with a tensor-parallel group every
    row runs through the vocabulary-parallel softmax (_ShardedCrossEntropy).
    """
    h, states, targets = h.reshape(-1, h.shape[-1]), states.reshape(-1), targets.reshape(-1)
    allowed, modality_of_id = tables.get(h.device)
    vs = weight.shape[0]
    grammar = loss_scope != "full"  # "target" has dropped its prompt targets already
    counted = tables.vocab.counted_targets(states, targets, grammar, allowed)
    if group is None:
        if vocab_start != 0 or vs != tables.vocab.size:
            raise ValueError(f"a head without a tensor-parallel group holds the whole table "
                             f"({tables.vocab.size} rows from 0), got {vs} rows from {vocab_start}")
        ce, lse = _SpanHeadCrossEntropy.apply(h, weight, tables.groups(states, counted, grammar), targets)
    else:
        bias = None
        if grammar:
            shard_allowed = allowed[:, vocab_start: vocab_start + vs]  # [n_states, Vs]
            # -inf: the Function's forward copes with rows where nothing is allowed
            bias = torch.zeros(shard_allowed.shape, device=h.device).masked_fill_(~shard_allowed, float("-inf"))
            bias = bias[states]  # [N,Vs]
        logits = F.linear(h, weight).float()  # [N,Vs]
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
