#!/usr/bin/env python
"""The process baseline of megamm/train/memory.py, measured: the peak RSS of a one-rank
`launch/train.py` run (torch, DeepSpeed, gloo, megamm's loader, kernels and tokenizers, the
threads and code pages a real training step touches) training a model of ~20k parameters
for two steps, less the estimator's own items for that model (a few hundred kB), so what
remains is what every run pays whatever its size.

    python benchmarks/memory_baseline.py [--ds_config zero3_offload.json] [--out FILE]

Each config runs in a fresh child process, which reports its own peak RSS (VmHWM, see
megamm.train.memory.peak_rss_bytes; getrusage or os.wait4 would also count this parent's
peak). Writes benchmarks/results/memory_baseline-<cpu|cuda>.json. `measure()` is what
tests/train/test_memory_estimate.py calibrates the estimate with on the machine it runs on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# runs launch/train.py and, at exit, writes its own peak RSS (bytes) to $MEGAMM_BASELINE_RSS,
# then, for failure messages, the anonymous/file split of its RSS at exit and its threads
RUN_AND_REPORT_RSS = (
    "import atexit, os, runpy, sys\n"
    "from megamm.train.memory import peak_rss_bytes\n"
    "def report():\n"
    "    keep = ('RssAnon', 'RssFile', 'RssShmem', 'Threads')\n"
    "    lines = [l for l in open('/proc/self/status') if l.split(':')[0] in keep]\n"
    "    open(os.environ['MEGAMM_BASELINE_RSS'], 'w').write(f'{peak_rss_bytes()}\\n' + ''.join(lines))\n"
    "atexit.register(report)\n"
    "sys.argv = ['launch/train.py', *sys.argv[1:]]\n"
    "runpy.run_path('launch/train.py', run_name='__main__')\n")
# the smallest model the tiny data trains: 1 block of width 8
MICRO = {"base": "tiny", "n_layers": 1, "d_model": 8, "n_heads": 1, "n_kv_heads": 1, "ffn_dim": 16}
SEQ = 32


def train_rss(config: str, model: str, data: Path, workdir: Path, env: dict | None = None,
              seq_len: int = SEQ, steps: int = 2) -> tuple[int, str, str]:
    """Run `launch/train.py` (one rank, micro batch 1) in a fresh child:
    (peak RSS bytes, "RssAnon: .. kB RssFile: .." at exit, its log). Raises RuntimeError
    with the log's tail when the run fails."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    name = f"{Path(model).stem}-{config}"
    rss_file, log = workdir / f"{name}.rss", workdir / f"{name}.log"
    env["MEGAMM_BASELINE_RSS"] = str(rss_file)
    cmd = [sys.executable, "-c", RUN_AND_REPORT_RSS, "--ds_config", config, "--model", model,
           "--data", str(data), "--seq-len", str(seq_len), "--micro-batch", "1", "--grad-accum", "1",
           "--max-steps", str(steps), "--no-progress"]
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if code or not rss_file.exists():
        raise RuntimeError(f"launch/train.py --model {model} --ds_config {config} exited {code}:\n{text[-4000:]}")
    peak, _, at_exit = rss_file.read_text().partition("\n")
    return int(peak), " ".join(at_exit.split()), text


def model_items(model: str, config: str, seq_len: int = SEQ) -> float:
    """The estimator's prediction for a one-rank CPU run, without its baseline item (bytes)."""
    from megamm.config import resolve_model
    from megamm.parallel.topology import Topology
    from megamm.train import ds_config
    from megamm.train.memory import estimate

    cfg = resolve_model(model)
    ds_cfg = ds_config.apply_overrides(ds_config.load(config), micro_batch=1, grad_accum=1)
    ckpt = cfg.activation_checkpointing or "activation_checkpointing" in ds_cfg
    est = estimate(cfg, ds_cfg, Topology.for_world(1), micro_batch=1, seq_len=seq_len,
                   activation_checkpointing=ckpt, accelerator="cpu", baseline=0.0)
    return est.total("gpu") + est.total("host")


def measure(config: str = "zero3_offload.json", data: Path | None = None, workdir: Path | None = None) -> int:
    """The baseline in bytes on this machine under `config`: a micro-model run's peak RSS less
    the estimator's items for it. Writes synthetic data into `workdir` unless `data` is given."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "micro.json"
        model.write_text(json.dumps(MICRO))
        if data is None:
            from megamm.config import get_preset
            from megamm.data.synthetic import write_synthetic_dataset

            data = write_synthetic_dataset(work / "data", get_preset("tiny").vocab, n_train=100, n_val=8, seed=0)
        peak, _, _ = train_rss(config, str(model), data, work)
        return int(peak - model_items(str(model), config))


def main(argv=None) -> int:
    import deepspeed
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ds_config", "--ds-config", dest="ds_configs", action="append")
    p.add_argument("--out")
    a = p.parse_args(argv)
    configs = a.ds_configs or ["zero3_offload.json", "zero2.json", "zero1.json"]
    with tempfile.TemporaryDirectory() as tmp:
        from megamm.config import get_preset
        from megamm.data.synthetic import write_synthetic_dataset

        data = write_synthetic_dataset(Path(tmp) / "data", get_preset("tiny").vocab, n_train=100, n_val=8, seed=0)
        rss = {c: measure(c, data=data, workdir=Path(tmp)) for c in configs}
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "memory_baseline", "baseline_bytes": rss, "max_bytes": max(rss.values()),
        "model": MICRO, "seq_len": SEQ,
        "device": torch.cuda.get_device_name(0) if kind == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/memory_baseline.py", *(argv or sys.argv[1:])]),
        "note": "since 2026-12-04 a real launch/train.py run of a micro model less its estimated items "
                "(was a one-parameter torch.nn.Linear under DeepSpeed: 0.475 GB on 2026-12-01, 0.511 GB "
                "on 2026-12-04, which left megamm's own imports, threads and code pages unaccounted)",
    }
    print(json.dumps(result, indent=1))
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"memory_baseline-{kind}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
