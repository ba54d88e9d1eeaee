"""Checkpoints that never lose data, and loading one into a plain model.

Layout of a save directory:

    <save_dir>/latest          name of the newest complete checkpoint (replaced atomically)
    <save_dir>/step<N>/        DeepSpeed's files + megamm.json + rng_rank<r>.pt

A save goes to `<save_dir>/.partial-step<N>/` first; only when every rank has written
its part does rank 0 rename it to `step<N>` and then atomically point `latest` at it.
A save killed at any moment leaves the previous `latest` and its directory untouched.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from megamm.config import ConfigError, ModelConfig
from megamm.parallel.distributed import barrier
from megamm.parallel.tensor_parallel import merge_shards

META_FILE = "megamm.json"
LATEST = "latest"


class CheckpointError(ConfigError):
    """A checkpoint that is missing or unreadable."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, save_dir, step: int, client_state: dict, meta: dict, rank: int) -> Path:
    """Save engine state + client_state as `step<step>`; returns the final directory."""
    save_dir = Path(save_dir)
    tag, tmp_tag = f"step{step}", f".partial-step{step}"
    tmp_dir, final_dir = save_dir / tmp_tag, save_dir / tag
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # debris of a killed save
    barrier()
    engine.save_checkpoint(str(save_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tmp_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    barrier()
    if rank == 0:
        _fsync_tree(tmp_dir)
        old = save_dir / f".old-{tag}"
        if final_dir.exists():  # re-saving a step (e.g. after a resume): keep it until the swap
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        _write_atomic(save_dir / LATEST, tag)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final_dir


def latest_tag(save_dir) -> str:
    save_dir = Path(save_dir)
    f = save_dir / LATEST
    if not f.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {f} does not exist")
    tag = f.read_text().strip()
    if not (save_dir / tag).is_dir():
        raise CheckpointError(f"{f} names {tag!r} but {save_dir / tag} is missing")
    return tag


def has_latest(save_dir) -> bool:
    """Whether save_dir (may be None) names a `latest` checkpoint to resume from."""
    return save_dir is not None and (Path(save_dir) / LATEST).is_file()


def resume(engine, save_dir, rank: int) -> dict:
    """Load the latest checkpoint of save_dir into engine; returns its client state."""
    tag = latest_tag(save_dir)
    path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {Path(save_dir) / tag}")
    rng_file = Path(save_dir) / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def checkpoint_dir(path) -> Path:
    """A save dir (with `latest`) or one checkpoint dir -> the checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / META_FILE).is_file():
        return path
    if (path / LATEST).is_file():
        return path / latest_tag(path)
    raise CheckpointError(f"{path} is not a megamm checkpoint (no {META_FILE} and no {LATEST})")


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / META_FILE}: unreadable ({e})") from None


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole plain model from a checkpoint of any layout: each
    tensor-parallel rank's state (from the ZeRO partitions, the model file, or the
    pipeline's per-layer files) under plain-model names, then the shards merged."""
    meta = read_meta(ckpt)
    layout = meta.get("topology", {})
    tp, pp = int(layout.get("tp", 1)), int(layout.get("pp", 1))
    n_layers = ModelConfig.from_dict(meta["model"]).n_layers
    shards = [_tp_rank_state(ckpt, int(meta.get("zero_stage", 0)), pp, r, n_layers) for r in range(tp)]
    return {k: v.float() for k, v in merge_shards(shards).items()}


def _tp_rank_state(ckpt: Path, zero_stage: int, pp: int, tp_rank: int, n_layers: int) -> dict:
    if pp > 1:  # ZeRO 0/1: every layer file holds its module weights
        from megamm.parallel.pipeline import plain_name

        sd = {}
        for f in sorted(ckpt.glob("layer_*-model_states.pt")):
            parts = f.name.split("-")  # layer_XX[-model_YY]-model_states.pt
            if any(p.startswith("model_") and p != f"model_{tp_rank:02d}" for p in parts[1:-1]):
                continue
            layer = int(parts[0].removeprefix("layer_"))
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                sd[plain_name(layer, n_layers, k)] = v
        if not sd:
            raise CheckpointError(f"{ckpt}: no pipeline layer files for tensor-parallel rank {tp_rank}")
        return sd
    if zero_stage > 0:  # the fp32 master weights, gathered from the ZeRO partitions of this tp rank
        return _zero_fp32(ckpt, tp_rank)
    f = ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: missing {f.name}")
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


def _zero_fp32(ckpt: Path, tp_rank: int) -> dict:
    """DeepSpeed's zero_to_fp32 over the files of one tensor-parallel rank (it reads
    every file in a directory, so it is shown a directory of links to just those)."""
    import contextlib
    import io
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mine = f"mp_rank_{tp_rank:02d}"
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "view"
        view.mkdir()
        for f in ckpt.iterdir():
            if mine in f.name:
                (view / f.name.replace(mine, "mp_rank_00")).symlink_to(f.resolve())
        if not any(view.iterdir()):
            raise CheckpointError(f"{ckpt}: no files of tensor-parallel rank {tp_rank}")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag="view")


def load_model(path):
    """megamm.load_model: one plain model on CPU in eval mode with its config."""
    from megamm.model import Transformer

    ckpt = checkpoint_dir(path)
    meta = read_meta(ckpt)
    config = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Transformer(config, device="meta")
    model.to_empty(device="cpu")
    sd = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.eval()
