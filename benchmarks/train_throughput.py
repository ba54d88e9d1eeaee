#!/usr/bin/env python
"""Training throughput (tokens/s, and MFU on GPU) of a preset under a DeepSpeed config.

    python benchmarks/train_throughput.py --model tiny --ds_config zero3_offload.json
    deepspeed --num_gpus 4 benchmarks/train_throughput.py --ds_config zero1_3d.json --tp 2 --pp 2
    deepspeed --num_gpus 8 benchmarks/train_throughput.py --model 8b --ds_config zero3_offload.json --seq-len 4096

Runs the real trainer (megamm.train.loop.run) on synthetic grammar-valid data (or
--data DIR), drops the first --warmup-steps, and records the median step of the rest in
benchmarks/results/train_throughput-<device>-<model>-<config>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from megamm.config import get_preset
from megamm.data.synthetic import write_synthetic_dataset
from megamm.train.args import TrainArgs
from megamm.train.loop import run

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default="zero3_offload.json")
    p.add_argument("--data", help="token shards (default: a synthetic data set in a temp dir)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--out", help="result JSON path (default under benchmarks/results/)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps <= a.warmup_steps:
        print(f"error: --steps ({a.steps}) must exceed --warmup-steps ({a.warmup_steps})", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:  # each rank writes its own copy (same seed, same bytes): no waiting
            data = write_synthetic_dataset(Path(tmp) / f"data-rank{os.environ.get('RANK', '0')}",
                                           get_preset(a.model).vocab, n_train=4000, n_val=8)
        args = TrainArgs(ds_config=a.ds_config, model=a.model, data=str(data), seq_len=a.seq_len,
                         micro_batch=a.micro_batch, grad_accum=a.grad_accum, precision=a.precision,
                         max_steps=a.steps, warmup=1, progress=False, tp=a.tp, pp=a.pp,
                         sequence_parallel=a.sequence_parallel)
        records = run(args)
    if not records:  # not rank 0
        return 0
    timed = records[a.warmup_steps:]
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    result = {
        "benchmark": "train_throughput",
        "model": a.model, "ds_config": a.ds_config,
        "layout": {"tp": a.tp, "pp": a.pp, "sequence_parallel": a.sequence_parallel},
        "device": device_name(), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "tokens_per_s": tok_s,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
        "peak_mem_gb": max(r.get("mem_gb", 0.0) for r in timed) or None,
        "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
        "steps": a.steps, "warmup_steps": a.warmup_steps,
        "seq_len": a.seq_len or get_preset(a.model).max_seq_len,
        "versions": {"torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__,
                     "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(x) for x in
                            ["deepspeed", "--num_gpus", os.environ.get("LOCAL_WORLD_SIZE", "1"), *sys.argv]
                            if not x.startswith("--local_rank")),
    }
    print(json.dumps(result, indent=1))
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    layout = "" if a.tp == a.pp == 1 else f"-tp{a.tp}pp{a.pp}" + ("sp" if a.sequence_parallel else "")
    out = Path(a.out) if a.out else RESULTS / f"train_throughput-{kind}-{a.model}-{Path(a.ds_config).stem}{layout}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
