"""Deterministic, layout-independent initialisation.

Every parameter is drawn as its FULL tensor, in fp32, from a generator seeded by
(seed, the parameter's name in the plain model), then the local shard is kept. So the
values never depend on the parallel layout, the pipeline stage that builds a layer, the
build order or the training precision: a tp/pp/dp layout starts from exactly the
single-process model's weights for the same seed.

A parameter that holds a shard carries `megamm_shard = (dim, rank, parts)`
(megamm.parallel sets it); each leaf module says how to fill its full tensors through
`init_full(name, full, generator)`.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn


def generator_for(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()) + (seed << 32))


def full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    shard = getattr(param, "megamm_shard", None)
    if shard is not None:
        dim, _, parts = shard
        shape[dim] *= parts
    return shape


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Fill every parameter of `module` (materialised, not meta). `prefix` is the name of
    `module` inside the plain model (e.g. "layers.3." for a pipeline stage's block)."""
    seen: set[int] = set()
    for mname, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:  # tied: the first owner (the embedding) decides
                continue
            seen.add(id(p))
            name = prefix + (f"{mname}.{pname}" if mname else pname)
            full = torch.empty(full_shape(p), dtype=torch.float32)
            m.init_full(pname, full, generator_for(seed, name))
            shard = getattr(p, "megamm_shard", None)
            if shard is not None:
                dim, rank, parts = shard
                n = full.shape[dim] // parts
                full = full.narrow(dim, rank * n, n)
            p.copy_(full)


# attributes megamm.parallel puts on a sharded parameter (to_empty makes new Parameters)
_SHARD_ATTRS = ("megamm_shard", "tensor_model_parallel", "partition_dim", "partition_stride")


def materialize(module: nn.Module, device, seed: int, prefix: str = "") -> nn.Module:
    """A module built on the meta device -> allocated on `device` and initialised."""
    attrs = {name: {a: getattr(p, a) for a in _SHARD_ATTRS if hasattr(p, a)}
             for name, p in module.named_parameters()}
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        for a, value in attrs.get(name, {}).items():
            setattr(p, a, value)
    init_weights(module, seed, prefix)
    return module
