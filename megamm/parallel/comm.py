"""Collectives that autograd can differentiate through, over a tensor-parallel group.

    copy_to_tp        forward: identity          backward: all-reduce (sum)
    reduce_from_tp    forward: all-reduce (sum)  backward: identity
    gather_seq        forward: all-gather dim 1  backward: reduce-scatter dim 1
    reduce_scatter_seq forward: reduce-scatter dim 1  backward: all-gather dim 1
    gather_last       forward: all-gather last dim    backward: keep own slice

Tensors are [B,S,...]; the sequence-parallel pieces are contiguous S/tp chunks in rank
order. gloo has no reduce-scatter, so there it is an all-reduce and a slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if dist.get_backend(group) == "gloo":
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x.chunk(n, dim=dim)[r].contiguous()
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[r])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _own_chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, 1, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, g):
        return _own_chunk(g, g.dim() - 1, ctx.group), None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def gather_seq(x, group):
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x, group):
    return _ReduceScatterSeq.apply(x, group)


def gather_last(x, group):
    return _GatherLast.apply(x, group)


def seq_chunk(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's S/tp chunk of a [B,S,...] tensor (no autograd communication)."""
    return _own_chunk(x, 1, group)
