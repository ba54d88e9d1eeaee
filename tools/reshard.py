#!/usr/bin/env python
"""Reshard a megamm training checkpoint to another tensor/pipeline layout, optimizer state included.

    python tools/reshard.py --checkpoint DIR --out OUT --tp N --pp M [--force]

DIR is a save dir (its `latest` checkpoint is taken) or one step dir, written under ZeRO
stage 1, 2 or 3 in any tensor/pipeline/data-parallel layout (or an earlier output of
this tool). OUT becomes a save dir with one checkpoint, `step<K>` at the step DIR had
reached, in DeepSpeed's universal layout (megamm/checkpoint/ds/universal.py): every parameter's
fp32 weight and Adam moments whole, Adam's step and hyper-parameters, the lr schedule,
DeepSpeed's step counters, the data loader's position and the RNG states. Then

    deepspeed launch/train.py ... --tp N --pp M --save-dir OUT --resume

continues the same loss curve under the new layout and any data-parallel size, as long
as the global batch (micro batch x grad accum x dp) stays the same and micro batch x dp
divides the rows the loader had consumed; the run needs ZeRO stage 1-3 (ZeRO-3 only
with --tp 1). RNG states are written for the source's data-parallel size: rank r of the
new layout gets the state of the source rank with its data-parallel index, its pipeline
stage's share of the layers and its tensor-parallel index (modulo the source's tp).

Bad input (a missing, damaged or mismatched checkpoint, one without optimizer state, a
--tp that does not divide the heads, FFN or vocabulary, a --pp the model cannot be cut
into, an existing OUT without --force) is one line starting `error:` and exit status 2.
OUT is written into a temporary folder and renamed into place: nothing is left half-written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from megamm.checkpoint import LATEST, META_FILE, CheckpointError, ds, manifest, read_meta, verified_checkpoint_dir
from megamm.checkpoint.ds import universal
from megamm.config import ConfigError, ModelConfig
from megamm.hf_folder import staged_output
from megamm.model import Transformer
from megamm.parallel.tensor_parallel import shard_dim
from megamm.parallel.topology import Topology
from megamm.train import layout


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Refuse, in one line, a layout this model cannot be cut into: training's own layout
    check (megamm.train.layout) for a ZeRO-1 run, which loads every layout's universal files."""
    if pp < 1:
        raise ConfigError(f"--pp must be >= 1, got {pp}")
    layout.check_layout(cfg, {"zero_optimization": {"stage": 1}}, Topology(tp=tp, pp=pp, dp=1), False)
    if pp > 1 and cfg.tie_embeddings:
        raise ConfigError("tie_embeddings with --pp > 1 is not supported; use --pp 1")


def loader_position(model_states: dict, source_dp: int) -> dict:
    """The loader state with the rows of the epoch already consumed ("rows"), which a run
    with another micro batch x dp resumes from (megamm.data.loader)."""
    loader = dict(model_states["loader"])
    if "rows" not in loader:  # saved before the loader recorded rows
        micro_batch = int(model_states["ds_config"]["train_micro_batch_size_per_gpu"])
        loader["rows"] = int(loader["micro_step"]) * micro_batch * source_dp
    return loader


def rng_sources(old: Topology, tp: int, pp: int) -> dict[int, int]:
    """New rank -> the source rank whose RNG state it takes (the source's dp is kept)."""
    new = Topology(tp=tp, pp=pp, dp=old.dp)
    out = {}
    for rank in range(new.world_size):
        stage, d, t = new.coords(rank)
        out[rank] = old.rank_of(stage * old.pp // new.pp, d, t % old.tp)
    return out


def write_step(state, step_dir: Path, tp: int, pp: int, log) -> int:
    """Write the universal checkpoint of `state` for tp, pp into step_dir; returns the
    number of parameters."""
    cfg = state.config
    with torch.device("meta"):
        expected = {n: p.shape for n, p in Transformer(cfg, device="meta").named_parameters()}
    if set(state.names) != set(expected):
        odd = sorted(set(state.names) ^ set(expected))
        raise CheckpointError(f"{state.ckpt}: its parameters do not match its model config ({odd[0]} "
                              f"{'is missing' if odd[0] in expected else 'is unexpected'})")
    for i, name in enumerate(state.names):
        tensors = {key: state.tensor(name, key) for key in universal.STATES}
        for key, t in tensors.items():
            if t.shape != expected[name]:
                raise CheckpointError(f"{state.ckpt}: {name} ({key}) is {list(t.shape)}, the model's is "
                                      f"{list(expected[name])}")
        universal.write_param(step_dir, name, tensors, shard_dim(name) or 0, state.step)
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(state.names)} parameters")
    universal.write_optimizer_state(step_dir, state.global_state, state.param_groups, state.step)
    return len(state.names)


def reshard(checkpoint: Path, out: Path, tp: int, pp: int, force: bool = False, log=print) -> Path:
    """The conversion behind the command line; returns the save dir written."""
    ckpt = verified_checkpoint_dir(checkpoint)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt}: megamm.json records no model config")
    check_layout(ModelConfig.from_dict(meta["model"]), tp, pp)
    if Path(out).exists() and not force:  # refuse before the (slow) reading
        raise ConfigError(f"output {out} already exists (pass --force to replace it)")
    layout = meta.get("topology", {})
    old = Topology(*(int(layout.get(k, 1)) for k in ("tp", "pp", "dp")))
    try:
        state = ds.read(ckpt)
        state.require_optimizer_state()
        step = int(state.model_states["step"])
        records = dict(state.model_states, module=None, mp_world_size=1,
                       loader=loader_position(state.model_states, old.dp))
    except ConfigError:
        raise
    except Exception as e:  # a partial or corrupt checkpoint: torch/DeepSpeed raise many kinds
        raise CheckpointError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    tag = f"step{step}"
    with staged_output(out, force) as tmp:
        step_dir = tmp / tag
        step_dir.mkdir()
        try:
            n = write_step(state, step_dir, tp, pp, log)
        except ConfigError:
            raise
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        for name in universal.MODEL_STATE_FILES:
            torch.save(records, step_dir / name)
        for rank, src in rng_sources(old, tp, pp).items():
            if (ckpt / f"rng_rank{src}.pt").is_file():
                shutil.copyfile(ckpt / f"rng_rank{src}.pt", step_dir / f"rng_rank{rank}.pt")
        (step_dir / META_FILE).write_text(json.dumps({
            **meta, "format": universal.FORMAT, "topology": {"tp": tp, "pp": pp, "dp": old.dp},
            "resharded_from": {"checkpoint": str(ckpt.resolve()), "topology": layout,
                               "zero_stage": meta.get("zero_stage")}}, indent=1))
        manifest.write(step_dir, manifest.entries(step_dir, manifest.list_files(step_dir), fsync=True))
        (tmp / LATEST).write_text(tag)
    log(f"wrote {out}: {tag}, {n} parameters with their Adam moments for --tp {tp} --pp {pp} "
        f"(from tp={old.tp} pp={old.pp} dp={old.dp}, ZeRO stage {meta.get('zero_stage')}); resume it with "
        f"--tp {tp} --pp {pp} --save-dir {out} --resume")
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="save dir or one step dir")
    ap.add_argument("--out", type=Path, required=True, help="save dir to write (resume from it with --resume)")
    ap.add_argument("--tp", type=int, required=True, help="tensor-parallel degree of the new layout")
    ap.add_argument("--pp", type=int, required=True, help="pipeline-parallel degree of the new layout")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        reshard(args.checkpoint, args.out, args.tp, args.pp, args.force)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
