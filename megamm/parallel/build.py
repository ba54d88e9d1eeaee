"""Building the model a rank trains, in one ordered function (pipeline stages are
built by megamm.parallel.pipeline from the same pieces):

    plain model on meta -> tensor parallel shards -> allocate + initialise from the seed
    -> activation checkpointing of each block

ZeRO-3 partitioning happens afterwards, in megamm.train.engine.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamm.config import ModelConfig
from megamm.model import Transformer, materialize
from megamm.parallel.tensor_parallel import TensorParallel, parallelize


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass instead of storing them
    (torch's non-reentrant checkpoint, only while training with gradients)."""
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, _block=block):
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False)
            return _forward(*args)
        block.forward = checkpointed


def build_transformer(cfg: ModelConfig, device, seed: int, tp: TensorParallel | None = None,
                      dtype: torch.dtype | None = None) -> Transformer:
    """The whole model (pp = 1) for this rank: the plain model, or its tensor-parallel
    shard; allocated directly in `dtype` when given (values drawn in fp32, then rounded)."""
    with torch.device("meta"):
        model = Transformer(cfg, device="meta")
        if dtype is not None:
            model.to(dtype)
    if tp is not None:
        parallelize(model, tp)
    materialize(model, device, seed)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    return model
