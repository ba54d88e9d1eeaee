"""`launch/train.py --init-from DIR`: start a run from another checkpoint's weights.

The checkpoint (any ZeRO stage, tp, pp; or a convert_from_hf output) is read as the
whole plain model's fp32 state dict on every rank (`load_init_state`, through
megamm.checkpoint's one consolidation path); then, before DeepSpeed wraps the freshly
built model, each parameter receives its part of the full tensor (`copy_into`): its
tensor-parallel shard (megamm.parallel.shard_dim). Parameter names are the plain
model's under every layout, pipeline stages included. Optimizer, schedule, step and
data position start fresh.
"""
from __future__ import annotations

import torch
from torch import nn

from megamm.checkpoint import checkpoint_dir, consolidated_state_dict, read_meta
from megamm.config import ConfigError, ModelConfig
from megamm.parallel.tensor_parallel import shard_dim

ARCHITECTURE = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab", "tie_embeddings")


def load_init_state(path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The plain fp32 weights of checkpoint `path`, checked against the run's model."""
    ckpt = checkpoint_dir(path)
    theirs = ModelConfig.from_dict(read_meta(ckpt)["model"])
    for name in ARCHITECTURE:
        if getattr(theirs, name) != getattr(cfg, name):
            raise ConfigError(f"--init-from {path}: its model has {name}={getattr(theirs, name)}, "
                              f"this run's has {getattr(cfg, name)}")
    return consolidated_state_dict(ckpt)


@torch.no_grad()
def copy_into(model: nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Overwrite this rank's parameters with their shards of the full state dict."""
    for name, p in model.named_parameters():
        if name not in full:
            raise ConfigError(f"--init-from: the checkpoint has no weight {name}")
        t = full[name]
        dim = shard_dim(name)
        if dim is not None and tp_size > 1:
            t = t.chunk(tp_size, dim)[tp_rank]
        if t.shape != p.shape:
            raise ConfigError(f"--init-from: {name} is {list(t.shape)} in the checkpoint, "
                              f"{list(p.shape)} here")
        p.copy_(t)
