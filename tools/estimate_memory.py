#!/usr/bin/env python
"""Predicted peak GPU and host memory of one training rank, item by item.

    python tools/estimate_memory.py --model PRESET --ds_config CFG --gpus N [--tp T] [--pp P]
        --micro-batch B --seq-len S [--activation-checkpointing] [--accelerator cuda|cpu]

Reads the same objects as training: the preset from megamm.config, the DeepSpeed JSON
through megamm.train.ds_config (a bare name resolves against ds_configs/). Prints the
breakdown (megamm/train/memory.py says what each item counts) and ends with the two
lines `GPU: N GB` and `host: N GB` (decimal GB, per rank). A layout training would
refuse (megamm.train.layout.check_layout, the same check) ends with one line naming the
culprit and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from megamm.config import PRESETS, ConfigError, get_preset
from megamm.parallel.topology import Topology
from megamm.train import ds_config
from megamm.train.memory import estimate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/estimate_memory.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", required=True)
    p.add_argument("--gpus", type=int, required=True, help="world size (ranks)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="checkpoint every block (also on when the preset or the ds_config asks)")
    p.add_argument("--accelerator", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the accelerator's memory is host memory (no CUDA context)")
    a = p.parse_args(argv)
    try:
        cfg = get_preset(a.model)
        ds_cfg = ds_config.apply_overrides(ds_config.load(a.ds_config), micro_batch=a.micro_batch)
        ckpt = a.activation_checkpointing or cfg.activation_checkpointing or "activation_checkpointing" in ds_cfg
        topo = Topology.for_world(a.gpus, tp=a.tp, pp=a.pp)
        est = estimate(cfg, ds_cfg, topo, a.micro_batch, a.seq_len, ckpt, accelerator=a.accelerator)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{a.model} ({cfg.num_parameters():,} parameters) x {a.ds_config} x {a.gpus} rank(s) "
          f"tp={topo.tp} pp={topo.pp} dp={topo.dp}, micro-batch {a.micro_batch} x {a.seq_len} "
          f"tokens, activation checkpointing {'on' if ckpt else 'off'}, per rank:")
    print(est.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
