"""Tensor parallelism (Megatron's scheme) applied to the plain model from outside.

One declarative plan says which parameters are split and along which dimension; it is
used to shard at build time, to merge shards when a checkpoint is loaded as one plain
model, and (later) by checkpoint conversion:

    q/k/v_proj, gate/up_proj   column-parallel: rows split  (whole kv groups per rank)
    o_proj, down_proj          row-parallel: columns split; outputs all-reduced
    embed.weight, head.weight  vocabulary-parallel: rows split
    norms, modality vectors    replicated

`parallelize(module, tp)` works on a module still on the meta device: it swaps each
split parameter for its shard (tagged `megamm_shard` for megamm.model.init, and with
the attributes DeepSpeed's gradient norm and clipping look for), and adds the
communication at the edges of each tensor-parallel region with forward hooks:
the input of attention, of the MLP and of the head is copied to the region (all-reduce
of its gradient); o_proj/down_proj outputs are all-reduced. With sequence parallelism
the residual stream, the norms and the embedding output stay split along the sequence:
region inputs are all-gathered and outputs reduce-scattered instead, and the norm and
modality weights, which then see only part of the sequence, sum their gradients.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamm.model.heads import OutputHead, TokenEmbedding
from megamm.model.layers import Attention, RMSNorm, SwiGLU, add_rms_norm, rms_norm
from megamm.parallel.comm import (copy_to_tp, gather_last, gather_seq, reduce_from_tp,
                                  reduce_scatter_seq, seq_chunk)

# (pattern on the parameter's name in the plain model, dimension split across tp ranks)
SHARD_PLAN: list[tuple[str, int]] = [
    (r"embed\.weight", 0),
    (r"head\.weight", 0),
    (r"layers\.\d+\.attn\.[qkv]_proj\.weight", 0),
    (r"layers\.\d+\.attn\.o_proj\.weight", 1),
    (r"layers\.\d+\.mlp\.(gate|up)_proj\.weight", 0),
    (r"layers\.\d+\.mlp\.down_proj\.weight", 1),
]


def shard_dim(name: str) -> int | None:
    """The dimension along which tensor parallelism splits parameter `name` (None: replicated)."""
    for pattern, dim in SHARD_PLAN:
        if re.fullmatch(pattern, name):
            return dim
    return None


def merge_shard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Tensor-parallel shards of parameter `name`, in tp rank order -> the whole tensor."""
    dim = shard_dim(name)
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim)


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """State dicts of tp ranks 0..tp-1 (plain-model names) -> one full state dict."""
    return {name: merge_shard(name, [s[name] for s in shards]) for name in shards[0]}


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group."""

    group: object
    rank: int
    size: int
    sequence_parallel: bool = False


class VocabParallelEmbedding(TokenEmbedding):
    """Rows [vocab_start, vocab_start + V/tp) of the table on each rank; ids outside
    the range look up zeros and the partial embeddings are summed over the group."""

    tp: TensorParallel

    def forward(self, ids):
        tp, rows = self.tp, self.weight.shape[0]
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= rows)
        e = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        if tp.sequence_parallel:
            ids = seq_chunk(ids, tp.group)
            modality = copy_to_tp(self.modality, tp.group)
            return reduce_scatter_seq(e, tp.group) + F.embedding(self.tables.get(ids.device)[1][ids], modality)
        return reduce_from_tp(e, tp.group) + self.modality_vectors(ids)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on a sequence chunk: its weight's gradient is summed over the group."""

    tp: TensorParallel

    def forward(self, x, residual=None):
        w = copy_to_tp(self.weight, self.tp.group)
        if residual is None:
            return rms_norm(x, w, self.eps, self.kernels)
        return add_rms_norm(x, residual, w, self.eps, self.kernels)


def _swap_class(module: nn.Module, cls: type, tp: TensorParallel) -> None:
    module.__class__ = cls  # same parameters and state-dict names, parallel forward
    module.tp = tp


def _enter_region(tp: TensorParallel):
    """Forward pre-hook: the first argument enters a tensor-parallel region."""
    enter = gather_seq if tp.sequence_parallel else copy_to_tp

    def hook(module, args):
        return (enter(args[0], tp.group), *args[1:])
    return hook


def _leave_region(tp: TensorParallel):
    """Forward hook: a row-parallel output leaves the region (partial sums combined)."""
    leave = reduce_scatter_seq if tp.sequence_parallel else reduce_from_tp

    def hook(module, args, output):
        return leave(output, tp.group)
    return hook


def _gather_logits(tp: TensorParallel):
    """Forward hook on the head: logits (no targets) come back over the whole vocabulary."""
    def hook(module, args, output):
        return gather_last(output, tp.group) if isinstance(output, torch.Tensor) else output
    return hook


def parallelize(module: nn.Module, tp: TensorParallel, prefix: str = "") -> nn.Module:
    """Shard `module` (on the meta device; `prefix` = its name in the plain model) for
    tensor-parallel rank tp.rank of tp.size. Returns the same module, changed in place."""
    if tp.size == 1:
        return module
    shards: dict[int, nn.Parameter] = {}  # id(full parameter) -> its shard (tied weights stay tied)
    for mname, m in list(module.named_modules()):
        for pname, p in list(m.named_parameters(recurse=False)):
            name = prefix + (f"{mname}.{pname}" if mname else pname)
            dim = shard_dim(name)
            if dim is None:
                continue
            if id(p) in shards:
                setattr(m, pname, shards[id(p)])
                continue
            shape = list(p.shape)
            shape[dim] //= tp.size
            shard = nn.Parameter(torch.empty(shape, device="meta", dtype=p.dtype))
            shard.megamm_shard = (dim, tp.rank, tp.size)
            # what DeepSpeed reads: counted on every tp rank by the gradient norm
            shard.tensor_model_parallel, shard.partition_dim, shard.partition_stride = True, dim, 1
            setattr(m, pname, shard)
            shards[id(p)] = shard
    for m in list(module.modules()):
        if isinstance(m, TokenEmbedding):
            _swap_class(m, VocabParallelEmbedding, tp)
            m.vocab_start = tp.rank * m.weight.shape[0]
        elif isinstance(m, OutputHead):
            m.vocab_start, m.group = tp.rank * m.weight.shape[0], tp.group
            m.register_forward_pre_hook(_enter_region(tp))
            m.register_forward_hook(_gather_logits(tp))
        elif isinstance(m, (Attention, SwiGLU)):
            m.register_forward_pre_hook(_enter_region(tp))
            out = m.o_proj if isinstance(m, Attention) else m.down_proj
            out.register_forward_hook(_leave_region(tp))
        elif isinstance(m, RMSNorm) and tp.sequence_parallel:
            _swap_class(m, SequenceParallelRMSNorm, tp)
    return module
