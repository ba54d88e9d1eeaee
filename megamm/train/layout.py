"""The one layout check: which (model, DeepSpeed config, topology) combinations a run can
train, refused otherwise in one line naming the flag. Training and the memory estimator
both call it; it imports neither torch's engine nor DeepSpeed.
"""
from __future__ import annotations

from megamm.config import ConfigError, ModelConfig
from megamm.parallel.topology import Topology
from megamm.train import ds_config


def check_layout(cfg: ModelConfig, ds_cfg: dict, topo: Topology, sequence_parallel: bool) -> None:
    """Refuse, in one line naming the flag, a layout this model or DeepSpeed cannot run."""
    cfg.check_tensor_parallel(topo.tp)
    stage = ds_config.zero_stage(ds_cfg)
    if topo.pp > 1 and stage > 1:
        raise ConfigError(f"--pp {topo.pp} needs ZeRO stage 0 or 1 (DeepSpeed's pipeline engine refuses "
                          f"ZeRO-2/3; this config has stage {stage}): use --ds_config zero1_3d.json, "
                          f"or --pp 1 with ZeRO-3 + --tp for large models")
    if topo.pp > cfg.n_layers + 3:
        raise ConfigError(f"--pp {topo.pp} is more stages than the model's {cfg.n_layers + 3} layers "
                          f"(embedding, {cfg.n_layers} blocks, norm, head)")
    if sequence_parallel:
        if topo.tp == 1:
            raise ConfigError("--sequence-parallel needs --tp > 1 (it splits the sequence over the tp group)")
        if cfg.max_seq_len % topo.tp:
            raise ConfigError(f"--sequence-parallel needs --seq-len divisible by --tp {topo.tp}, "
                              f"got {cfg.max_seq_len}")
