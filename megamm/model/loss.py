"""The training loss: cross-entropy under the modality grammar, over the head's rows.

    h [N,D], head rows [Vs,D] = ids [start, start+Vs) of the vocabulary
    -> per counted row: logits over its state's columns -> (ce, lse) -> loss_sum, stats

With loss_scope "modality", position i's softmax runs only over the ids its grammar
state allows next (`Vocab.allowed_ranges`), which is exactly what sampling allows;
"full" keeps the plain softmax over every row.

`_ChunkedGrammarHead` fuses the head's matmul with the loss and computes only what
counts: rows whose target is counted, grouped by grammar state, each group over its
state's columns (an image position: the image codebook's logits, not the whole
vocabulary's). The loss and gradients are those of the full logits with forbidden ids
at -inf.

Memory does not grow with tokens x vocabulary: a group's rows are cut into chunks (and
a span wider than one chunk into column blocks, `HeadChunking`), each chunk's fp32
logits become its gradient in the forward (d loss_sum / d logits = softmax x (1 + 2 z
lse) - onehot(target)), the chunk's share of d h and d weight is accumulated, and the
chunk is freed. The backward only scales the two gradients by the incoming one; it
returns them to autograd, so the weight's gradient reaches the parameter (and ZeRO's
hooks) the ordinary way, and the table is used only in the forward.

Vocabulary-parallel tensor parallelism (each rank holds a contiguous row range, `group`
is the tensor-parallel group): the same chunks, each rank over its own part of each
state's columns; one all-gather per row chunk combines the ranks' log-sum-exp and
target logit, so no rank ever holds full-vocabulary logits. Each rank's d h is its own
columns' part (the head's tensor-parallel hook sums them); d weight is local.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamm.vocab import MODALITY_NAMES, Vocab

N_STATS = 2 * len(MODALITY_NAMES)  # per-modality summed cross-entropy, then counts

FORBIDDEN = -1e30
"""The logit bias of an id the grammar forbids inside a column span the head computes
(`GrammarTables.spans`): exp(-1e30 - max) is exactly 0 in fp32, so the softmax over the
span is the one over the state's allowed ids."""

PAD_ROWS = 16
"""Row counts of the head's GEMMs are padded to a multiple of this (and chunks are
multiples of it): CPU GEMMs whose output has a handful of rows (5-11 seen) round
differently with the thread count; a state's group can be that small, and launchers
that pick different thread counts must train the same curve."""


@dataclass(frozen=True)
class HeadChunking:
    """How the head cuts its work so no [rows, columns] fp32 block outlives its chunk.

    A group of rows over a span of `width` columns runs in chunks of `rows(width)` rows
    (a multiple of PAD_ROWS, never fewer than min_rows) and each chunk in column blocks
    of `columns(...)`: one block when rows x width <= elements, else blocks of
    elements // rows columns, which costs one more matmul (the logits are recomputed
    once the row's log-sum-exp over all blocks is known).

    The default, 2^25 elements (a 128 MB fp32 block), gives the 8b preset's text span
    (151,644 columns) 208-row chunks and leaves every preset's spans in one block.
    """

    elements: int = 2 ** 25
    min_rows: int = 128

    def __post_init__(self):
        if self.min_rows < PAD_ROWS or self.min_rows % PAD_ROWS:
            raise ValueError(f"HeadChunking.min_rows must be a positive multiple of {PAD_ROWS}, "
                             f"got {self.min_rows}")
        if self.elements < 1:
            raise ValueError(f"HeadChunking.elements must be >= 1, got {self.elements}")

    def rows(self, width: int) -> int:
        """Rows per chunk of a group whose state spans `width` columns of the whole table."""
        return max(self.min_rows, self.elements // max(width, 1) // PAD_ROWS * PAD_ROWS)

    def columns(self, rows: int, width: int) -> int:
        """Columns per block of a chunk of `rows` rows over `width` columns."""
        return width if rows * width <= self.elements else max(1, self.elements // rows)


DEFAULT_CHUNKING = HeadChunking()


class Span(NamedTuple):
    """The columns of one grammar state in a table of rows [start, start+Vs): rows
    [lo, hi) of the table (local), with a FORBIDDEN `bias` [hi-lo] on the ids between
    allowed ranges, or the allowed rows themselves (`ids`, sorted, local)."""

    lo: int
    hi: int
    ids: torch.Tensor | None
    bias: torch.Tensor | None

    @property
    def width(self) -> int:
        return self.hi - self.lo if self.ids is None else self.ids.numel()

    def column_of(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Table-local ids [n] -> their column in this span, -1 where they are none of its
        columns (a target on another rank; a FORBIDDEN column is never a counted target)."""
        if self.ids is None:
            col = local_ids - self.lo
            return torch.where((col >= 0) & (col < self.hi - self.lo), col, torch.full_like(col, -1))
        pos = torch.searchsorted(self.ids, local_ids).clamp(max=self.ids.numel() - 1)
        return torch.where(self.ids[pos] == local_ids, pos, torch.full_like(pos, -1))

    def block(self, weight: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Table rows [c1-c0, D] of columns [c0, c1) (a view of a slice) and their bias."""
        if self.ids is not None:
            return weight.index_select(0, self.ids[c0:c1]), None
        return weight[self.lo + c0: self.lo + c1], None if self.bias is None else self.bias[c0:c1]


class Group(NamedTuple):
    """Counted rows [n] of one grammar state (or all of them under the plain softmax),
    the state's columns in this table (None: none here) and rows per chunk (the same on
    every tensor-parallel rank: it follows the state's width in the whole table)."""

    rows: torch.Tensor
    span: Span | None
    chunk_rows: int


def _span(ranges: list[tuple[int, int]], start: int, size: int) -> Span | None:
    """Allowed id ranges -> their Span in the table of rows [start, start+size); None if
    the table holds none of them. One range: a slice; several: the slice from the first
    to the last with a FORBIDDEN bias between them when those ids are few, else `ids`."""
    local = [(max(a, start) - start, min(b, start + size) - start) for a, b in ranges
             if a < start + size and b > start]
    if not local:
        return None
    lo, hi = local[0][0], local[-1][1]
    allowed = sum(b - a for a, b in local)
    if len(local) == 1:
        return Span(lo, hi, None, None)
    if (hi - lo) - allowed <= max(64, allowed // 8):
        bias = torch.full((hi - lo,), FORBIDDEN)
        for a, b in local:
            bias[a - lo: b - lo] = 0.0
        return Span(lo, hi, None, bias)
    return Span(lo, hi, torch.cat([torch.arange(a, b) for a, b in local]), None)


class GrammarTables:
    """Per-device lookup tables of a vocabulary (cached; never part of a state dict)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._spans: dict[tuple, list] = {}

    def get(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed [n_states, V] bool, modality_of_id [V] int64) on device."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.vocab.allowed_table().to(device),
                                self.vocab.modality_table().to(device))
        return self._cache[key]

    def spans(self, device, grammar: bool = True, start: int = 0, size: int | None = None) -> list[Span | None]:
        """The columns the head computes, in the table of rows [start, start+size) (default:
        the whole table): per grammar state (grammar), or one span over every row."""
        size = self.vocab.size if size is None else size
        key = (str(device), grammar, start, size)
        if key not in self._spans:
            every = [[(0, self.vocab.size)]]
            ranges = [self.vocab.allowed_ranges(s) for s in range(self.vocab.n_states)] if grammar else every
            out = []
            for r in ranges:
                span = _span(r, start, size)
                if span is not None:
                    span = Span(span.lo, span.hi, *(None if t is None else t.to(device) for t in span[2:]))
                out.append(span)
            self._spans[key] = out
        return self._spans[key]

    def groups(self, states, counted, grammar: bool, chunking: HeadChunking = DEFAULT_CHUNKING,
               start: int = 0, size: int | None = None) -> list[Group]:
        """The counted rows split for _ChunkedGrammarHead: one Group per grammar state
        present (grammar) or one over every row, in the same order on every rank.
        One host synchronisation."""
        n_keys = self.vocab.n_states if grammar else 1
        key = torch.where(counted, states if grammar else torch.zeros_like(states),
                          torch.full_like(states, n_keys))
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=n_keys + 1).tolist()
        whole, local = self.spans(states.device, grammar), self.spans(states.device, grammar, start, size)
        out, at = [], 0
        for k in range(n_keys):
            if counts[k]:
                out.append(Group(order[at: at + counts[k]], local[k], chunking.rows(whole[k].width)))
            at += counts[k]
        return out


def _pad_rows(t, multiple: int = PAD_ROWS):
    """t [n, k] with zero rows appended up to a multiple of PAD_ROWS."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def _block_logits(hc, weight, span: Span, c0: int, c1: int):
    """hc [R,D] -> fp32 logits [R, c1-c0] of the span's columns [c0, c1) (bias added) and
    the table rows they came from. The matmul runs in h's dtype, the rest in fp32."""
    w, bias = span.block(weight, c0, c1)
    logits = F.linear(hc, w).float()
    if bias is not None:
        logits += bias
    return logits, w


def _over_ranks(lse, tlogit, group):
    """Per-rank (log-sum-exp over the rank's columns, target logit or 0) [n] -> the same
    over every rank's columns, bitwise equal on every rank (one all-gather)."""
    both = torch.stack([lse, tlogit])
    parts = [torch.empty_like(both) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, both, group=group)
    stacked = torch.stack(parts)  # [world, 2, n]
    return torch.logsumexp(stacked[:, 0], 0), stacked[:, 1].sum(0)


CPU_K_BLOCK = 512
"""On the CPU the head's gradient GEMMs reduce over at most this many rows (d weight) or
columns (d h) at a time, in a fixed order: MKL splits longer reductions between threads,
and their rounding then depends on the thread count, which launchers (srun, mpirun) leave
different per rank."""


def _addmm_in_k_blocks(out, a, b):
    """out += a [M, K] @ b [K, N]; on the CPU as a fixed-order sum over blocks of
    CPU_K_BLOCK of the reduced dimension (the rows of a chunk, or a span's columns)."""
    k = a.shape[1]
    if a.device.type != "cpu" or k <= CPU_K_BLOCK:
        return out.addmm_(a, b)
    for i in range(0, k, CPU_K_BLOCK):
        out.addmm_(a[:, i:i + CPU_K_BLOCK], b[i:i + CPU_K_BLOCK])
    return out


def _matmul_in_k_blocks(a, b):
    """a [M, K] @ b [K, N], on the CPU reduced in fixed-order blocks (_addmm_in_k_blocks)."""
    if a.device.type != "cpu" or a.shape[1] <= CPU_K_BLOCK:
        return a @ b
    return _addmm_in_k_blocks(a[:, :CPU_K_BLOCK] @ b[:CPU_K_BLOCK], a[:, CPU_K_BLOCK:], b[CPU_K_BLOCK:])


class _Grads:
    """d loss_sum / d h [N,D] and / d weight [Vs,D] (h's and the weight's dtypes), summed
    chunk by chunk; None where no gradient is wanted."""

    def __init__(self, h, weight, needs: tuple[bool, bool]):
        self.h = torch.zeros_like(h) if needs[0] else None
        self.w = torch.zeros_like(weight) if needs[1] else None

    def add_block(self, p, hc, w, span: Span, c0: int, c1: int):
        """p [R, c] (h's dtype): d loss / d logits of a chunk's block; hc [R,D]; w the
        block's table rows. Adds the block's d weight; returns its d h, p @ w [R,D]
        (None when d h is not wanted)."""
        if self.w is not None:
            if span.ids is None and c1 - c0 >= 64:  # wide: straight into the table's rows
                _addmm_in_k_blocks(self.w[span.lo + c0: span.lo + c1], p.t(), hc)
            else:  # narrow: D (not the few columns) as the GEMM's rows
                gw = _matmul_in_k_blocks(hc.t(), p).t()
                if span.ids is None:
                    self.w[span.lo + c0: span.lo + c1] += gw
                else:
                    self.w.index_add_(0, span.ids[c0:c1], gw)
        return None if self.h is None else _matmul_in_k_blocks(p, w)


def _target_at(col, c0: int, c1: int):
    """Target columns [n] (-1: none) -> (whether each is in block [c0, c1), its column
    inside the block or 0) [n], [n, 1]."""
    inside = (col >= c0) & (col < c1)
    return inside, torch.where(inside, col - c0, torch.zeros_like(col))[:, None]


def _lse_pass(hc, n: int, weight, span: Span, blocks, col, keep: bool):
    """Log-sum-exp [n] and target logit [n] (0 where the target is none of the span's
    columns) of a chunk's rows over the span, block by block, each block's logits turned
    into exp(logits - row max) in place. keep: also return the one block's
    (exp(logits - m) [R, c], its table rows, m [n]) for the gradient."""
    lse, tlogit, kept = None, torch.zeros(n, device=hc.device), None
    for c0, c1 in blocks:
        logits, w = _block_logits(hc, weight, span, c0, c1)
        v = logits[:n]
        inside, at = _target_at(col, c0, c1)
        tlogit += torch.where(inside, v.gather(1, at).squeeze(1), torch.zeros_like(tlogit))
        m = v.amax(1)
        block_lse = m + v.sub_(m[:, None]).exp_().sum(1).log()
        lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
        if keep:
            kept = logits, w, m
        del logits, v
    return lse, tlogit, kept


def _grad_pass(hc, n: int, weight, span: Span, blocks, col, lse, z_loss: float, kept, grads: _Grads):
    """d loss / d logits = softmax x (1 + 2 z lse) - onehot(target), block by block
    (the kept block's exp(logits - m) rescaled, or each block's logits recomputed), into
    grads.w; returns the chunk's d h [R, D] (None when not wanted)."""
    coef = 1 + 2 * z_loss * lse if z_loss > 0 else None
    acc_h = None
    for c0, c1 in blocks:
        if kept is not None:  # exp(logits - m) x exp(m - lse) = softmax
            p, w, m = kept
            kept = None
            scale = torch.exp(m - lse)
            p[:n].mul_((scale if coef is None else scale * coef)[:, None])
        else:
            p, w = _block_logits(hc, weight, span, c0, c1)
            p[:n].sub_(lse[:, None]).exp_()
            if coef is not None:
                p[:n].mul_(coef[:, None])
        p[n:].zero_()  # the padding rows
        inside, at = _target_at(col, c0, c1)
        p[:n].scatter_add_(1, at, -inside.float()[:, None])
        part = grads.add_block(p.to(hc.dtype), hc, w, span, c0, c1)
        del p
        if part is not None:  # several blocks: d h summed in fp32
            acc_h = part if len(blocks) == 1 else part.float() if acc_h is None else acc_h.add_(part)
    return acc_h


def _row_chunk(h, weight, rows, span: Span | None, targets, cols: int, z_loss: float, group,
               grads: _Grads, ce, lse_out):
    """One chunk of a group: ce and lse of its rows (into ce, lse_out) and their gradient
    (into grads). `targets` are table-local ids; span None: this rank holds none of the
    state's columns (it still joins the all-gather)."""
    n = rows.numel()
    want_grad = grads.h is not None or grads.w is not None
    if span is None:
        lse, tlogit = torch.full((n,), float("-inf"), device=h.device), torch.zeros(n, device=h.device)
    else:
        hc = _pad_rows(h.index_select(0, rows))  # [R,D]
        blocks = [(c0, min(c0 + cols, span.width)) for c0 in range(0, span.width, cols)]
        col = span.column_of(targets.index_select(0, rows))
        lse, tlogit, kept = _lse_pass(hc, n, weight, span, blocks, col, want_grad and len(blocks) == 1)
    if group is not None:
        lse, tlogit = _over_ranks(lse, tlogit, group)
    ce.index_copy_(0, rows, lse - tlogit)
    lse_out.index_copy_(0, rows, lse)
    if want_grad and span is not None:
        acc_h = _grad_pass(hc, n, weight, span, blocks, col, lse, z_loss, kept, grads)
        if acc_h is not None:
            grads.h.index_copy_(0, rows, acc_h[:n].to(h.dtype))


class _ChunkedGrammarHead(torch.autograd.Function):
    """The head, fused and chunked: (h [N,D], weight [Vs,D], groups, table-local targets
    [N], z_loss, chunking, group, needs = (d h wanted, d weight wanted)) ->
    (loss_sum: sum over the groups' rows of ce + z_loss x lse^2, ce [N] fp32 detached,
    0 on rows in no group).

    Each group's rows run in chunks (`HeadChunking`); a chunk's logits live only while
    the chunk runs. A column span is a slice of the table (no copy) with a FORBIDDEN bias
    on the few ids inside it the state forbids, or the state's allowed rows gathered.
    The matmuls run in h's dtype, the softmax in fp32, as F.linear(h, weight).float()
    would. Gradients are computed in the forward and scaled in place in the backward,
    which therefore runs once.
    """

    @staticmethod
    def forward(ctx, h, weight, groups, targets, z_loss, chunking, group, needs):
        ce = torch.zeros(h.shape[0], device=h.device)
        lse = torch.zeros(h.shape[0], device=h.device)
        grads = _Grads(h, weight, needs)
        for g in groups:
            width = 0 if g.span is None else g.span.width
            cols = chunking.columns(g.chunk_rows, width)
            for at in range(0, g.rows.numel(), g.chunk_rows):
                _row_chunk(h, weight, g.rows[at: at + g.chunk_rows], g.span, targets, cols, z_loss,
                           group, grads, ce, lse)
        loss_sum = ce.sum()
        if z_loss > 0:
            loss_sum = loss_sum + z_loss * lse.pow(2).sum()
        ctx.grads = grads
        ctx.mark_non_differentiable(ce)
        return loss_sum, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the grammar head's backward runs once (it scales the gradients "
                               "its forward computed in place)")
        grads, ctx.grads = ctx.grads, None
        grad_h, grad_w = grads.h, grads.w
        del grads
        for g in (grad_h, grad_w):
            if g is not None:
                g.mul_(grad_loss)
        return grad_h, grad_w, None, None, None, None, None, None


def grammar_loss(h, weight, vocab_start: int, states, targets, tables: GrammarTables,
                 loss_scope: str = "modality", z_loss: float = 0.0, group=None,
                 chunking: HeadChunking = DEFAULT_CHUNKING, rows: bool = False):
    """h [B,S,D] or [N,D]; weight [Vs,D] holding vocabulary rows [vocab_start, +Vs);
    states, targets [B,S] or [N]. Returns (loss_sum, stats), with `rows` (loss_sum, stats,
    row_stats):

    loss_sum: scalar, the summed cross-entropy (+ z_loss x lse^2) of the counted targets;
    stats [N_STATS] fp32, detached: per-modality summed cross-entropy, then counts;
    row_stats [2, B] fp32 (B = 1 for [N] targets), detached: each row's summed
    cross-entropy, then its counted targets (a blend's per-source loss, megamm.train.engine).
    A target counts unless it is <pad>, after a document's end, or (modality scope)
    forbidden by its position's grammar state.

    Only counted rows are computed, each over the columns its state allows (all columns
    under "full"), in chunks (`chunking`); with a tensor-parallel `group` each rank over
    its own rows of the table. The backward runs once.
    """
    n_rows = targets.shape[0] if targets.dim() == 2 else 1
    h, states, targets = h.reshape(-1, h.shape[-1]), states.reshape(-1), targets.reshape(-1)
    allowed, modality_of_id = tables.get(h.device)
    vs = weight.shape[0]
    grammar = loss_scope != "full"  # "target" has dropped its prompt targets already
    counted = tables.vocab.counted_targets(states, targets, grammar, allowed)
    if group is None and (vocab_start != 0 or vs != tables.vocab.size):
        raise ValueError(f"a head without a tensor-parallel group holds the whole table "
                         f"({tables.vocab.size} rows from 0), got {vs} rows from {vocab_start}")
    groups = tables.groups(states, counted, grammar, chunking, vocab_start, vs)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and weight.requires_grad)
    loss_sum, ce = _ChunkedGrammarHead.apply(h, weight, groups, targets - vocab_start, z_loss, chunking,
                                             group, needs)
    w = counted.float()
    mod = modality_of_id[targets]
    n_mod = len(MODALITY_NAMES)
    msum = torch.zeros(n_mod, device=h.device).index_add(0, mod, ce * w)
    mcount = torch.zeros(n_mod, device=h.device).index_add(0, mod, w)
    if rows:
        per_row = torch.stack([(ce.detach() * w).view(n_rows, -1).sum(1), w.view(n_rows, -1).sum(1)])
        return loss_sum, torch.cat([msum, mcount]), per_row
    return loss_sum, torch.cat([msum, mcount])
