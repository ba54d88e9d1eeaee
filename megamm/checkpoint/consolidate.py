"""One consolidation path: a checkpoint of any layout -> the whole plain model's weights.

`consolidated_state_dict(ckpt)` asks the DeepSpeed adapter (megamm.checkpoint.ds.read)
for the checkpoint's state and takes, for every parameter under its plain-model name,
the fp32 master weight where the layout keeps one (ZeRO-1/2/3, universal), else the
16-bit module weight (ZeRO-0), tensor-parallel shards merged. `load_model`,
tools/convert_to_hf.py, `--init-from` and tools/reshard.py all read through it, so they
cannot disagree about one checkpoint's weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megamm.checkpoint import ds
from megamm.checkpoint.layout import CheckpointError, verified_checkpoint_dir
from megamm.model import Transformer


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole plain model (tied head included) from checkpoint dir `ckpt`."""
    return _weights(ds.read(ckpt))


def _weights(state: ds.CheckpointState) -> dict[str, torch.Tensor]:
    sd = {name: state.weight(name).float() for name in state.names}
    if state.config.tie_embeddings and "embed.weight" in sd:
        sd["head.weight"] = sd["embed.weight"]
    return sd


def load_model(path) -> Transformer:
    """megamm.load_model: one plain model on CPU in eval mode with its config; a damaged
    checkpoint or one whose weights do not fit its model config is a CheckpointError."""
    ckpt = verified_checkpoint_dir(path)
    state = ds.read(ckpt)
    with torch.device("meta"):
        model = Transformer(state.config, device="meta")
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(_weights(state), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.eval()
