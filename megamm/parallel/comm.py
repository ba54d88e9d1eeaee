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


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x.view_as(x)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _Collective(torch.autograd.Function):
    """forward(x) = fwd(x, group); backward(g) = bwd(g, group) (its adjoint)."""

    @staticmethod
    def forward(ctx, x, group, fwd, bwd):
        ctx.group, ctx.bwd = group, bwd
        return fwd(x, group)

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g, ctx.group), None, None, None


def copy_to_tp(x, group):
    return _Collective.apply(x, group, _identity, _all_reduce)


def reduce_from_tp(x, group):
    return _Collective.apply(x, group, _all_reduce, _identity)


def gather_seq(x, group):
    return _Collective.apply(x, group, lambda t, g: _all_gather(t, 1, g), lambda t, g: _reduce_scatter(t, 1, g))


def reduce_scatter_seq(x, group):
    return _Collective.apply(x, group, lambda t, g: _reduce_scatter(t, 1, g), lambda t, g: _all_gather(t, 1, g))


def gather_last(x, group):
    return _Collective.apply(x, group, lambda t, g: _all_gather(t, t.dim() - 1, g),
                             lambda t, g: _own_chunk(t, t.dim() - 1, g))


def seq_chunk(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's S/tp chunk of a [B,S,...] tensor (no autograd communication)."""
    return _own_chunk(x, 1, group)
