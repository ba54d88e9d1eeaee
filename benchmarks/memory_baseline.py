#!/usr/bin/env python
"""The process baseline of megamm/train/memory.py, measured: peak RSS of one rank that
imports torch + deepspeed, joins a one-rank gloo group and trains a one-parameter model
for two steps under a DeepSpeed config (so DeepSpeed's C++ Adam op is loaded).

    python benchmarks/memory_baseline.py [--ds_config zero3_offload.json] [--out FILE]

Each config runs in a fresh child process, which reports its own peak RSS (VmHWM, see
megamm.train.memory.peak_rss_bytes; getrusage or os.wait4 would also count this parent's peak).
Writes benchmarks/results/memory_baseline-<cpu|cuda>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, socket, sys
import torch, deepspeed
from megamm.train import ds_config
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
deepspeed.init_distributed(dist_backend="gloo")
cfg = ds_config.apply_overrides(ds_config.load(sys.argv[1]), micro_batch=1, grad_accum=1)
model = torch.nn.Linear(1, 1, bias=False)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
x = torch.ones(1, 1, device=engine.device, dtype=next(engine.parameters()).dtype)
for _ in range(2):
    engine.backward(engine(x).float().sum())
    engine.step()
from megamm.train.memory import peak_rss_bytes
print("PEAK_RSS_BYTES", peak_rss_bytes())
"""


def peak_rss(cmd: list[str], env: dict) -> int:
    """Run cmd to completion; the peak resident set in bytes it reports (its PEAK_RSS_BYTES line)."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_BYTES")))


def main(argv=None) -> int:
    import deepspeed
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ds_config", "--ds-config", dest="ds_configs", action="append")
    p.add_argument("--out")
    a = p.parse_args(argv)
    configs = a.ds_configs or ["zero3_offload.json", "zero2.json", "zero1.json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    rss = {c: peak_rss([sys.executable, "-c", CHILD, c], env) for c in configs}
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "memory_baseline", "peak_rss_bytes": rss, "max_bytes": max(rss.values()),
        "device": torch.cuda.get_device_name(0) if kind == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/memory_baseline.py", *(argv or sys.argv[1:])]),
    }
    print(json.dumps(result, indent=1))
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"memory_baseline-{kind}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
