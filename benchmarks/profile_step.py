#!/usr/bin/env python
"""Where a training step's time goes, megamm against the stock-Llama baseline
(benchmarks/hf_baseline.py), under the same DeepSpeed config and batches as
benchmarks/train_throughput.py:

    python benchmarks/profile_step.py --model tiny --ds_config zero2.json --seq-len 128 --micro-batch 4

Each implementation runs in its own process (one CPU rank): --warmup-steps untimed steps,
then --steps steps under torch.profiler (CPU activity). Per step it reports the wall time,
the summed self time of the operators (aten ops and autograd nodes' kernels, i.e. every
profiler event that is not a Python-level region), the wall time outside them (Python,
the framework and hooks between operators), and the top operators by self time; then the
same steps again under cProfile for the Python functions with the most own time (cProfile
slows Python, so its numbers rank, the torch.profiler ones measure). Written to
benchmarks/results/profile_step.json (--out to change; profile_bf16-cpu.json gathers the bf16 runs).

`--impl megamm|hf` runs one implementation in this process (what the children do).
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_throughput as tt  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="tiny")
    a("--ds_config", "--ds-config", dest="ds_config", default="zero2.json")
    a("--data")
    a("--seq-len", type=int)
    a("--micro-batch", type=int)
    a("--grad-accum", type=int, default=1)
    a("--loss-scope", choices=["full", "modality"], default="full")
    a("--steps", type=int, default=10)
    a("--warmup-steps", type=int, default=3)
    a("--top", type=int, default=15)
    a("--seed", type=int, default=1234)
    a("--out")
    a("--impl", choices=["megamm", "hf"], help=argparse.SUPPRESS)
    a("--child-out", help=argparse.SUPPRESS)
    return p


def _stepper(a):
    """(one training step as a function, the config) for a.impl, built as the benchmark does."""
    from megamm.train import loop

    targs = tt._train_args(argparse.Namespace(**{**vars(a), "precision": None, "activation_checkpointing": None,
                                                 "tp": 1, "pp": 1, "sequence_parallel": False,
                                                 "steps": a.warmup_steps + 2 * a.steps}),
                           a.loss_scope)
    cfg, ds_cfg = loop.load_configs(targs)
    if a.impl == "megamm":
        r = loop.setup(targs, cfg, ds_cfg)
        counter = iter(range(1, 10 ** 9))
        return lambda: r.trainer.train_step([r.loader.next_batch() for _ in range(r.trainer.gas)],
                                            next(counter)), ds_cfg
    import hf_baseline

    from megamm.parallel.distributed import init_distributed

    b = hf_baseline.Baseline(cfg, ds_cfg, a.data, a.seed, init_distributed(), a.loss_scope)
    return b.step, ds_cfg


def _op_summary(prof, steps: int, wall: float, top: int) -> dict:
    """Operator self time per step from a torch.profiler run over `steps` steps."""
    self_us, calls = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        if e.key.startswith("##") or e.key.startswith("ProfilerStep"):
            continue
        self_us[e.key] += e.self_cpu_time_total
        calls[e.key] += e.count
    total_ms = sum(self_us.values()) / 1e3 / steps
    ranked = sorted(self_us, key=self_us.get, reverse=True)[:top]
    return {"wall_ms_per_step": wall * 1e3 / steps, "operator_ms_per_step": total_ms,
            "outside_operators_ms_per_step": wall * 1e3 / steps - total_ms,
            "top_operators": [{"op": k, "self_ms_per_step": self_us[k] / 1e3 / steps,
                               "calls_per_step": calls[k] / steps} for k in ranked]}


def _python_summary(step, steps: int, top: int) -> dict:
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(pr)
    rows = []
    for (file, line, fn), (_cc, nc, tt_, _ct, _callers) in st.stats.items():
        where = fn if file == "~" else f"{Path(file).name}:{line}({fn})"
        rows.append((tt_, nc, where))
    rows.sort(reverse=True)
    calls = sum(r[1] for r in rows)
    return {"wall_ms_per_step_under_cprofile": wall * 1e3 / steps, "python_calls_per_step": calls / steps,
            "top_own_time": [{"function": w, "own_ms_per_step": t * 1e3 / steps, "calls_per_step": n / steps}
                             for t, n, w in rows[:top]]}


def run_one(a) -> int:
    from torch.profiler import ProfilerActivity, profile

    step, _ = _stepper(a)
    for _ in range(a.warmup_steps):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        wall = time.perf_counter() - t0
    out = {"impl": a.impl, **_op_summary(prof, a.steps, wall, a.top), **_python_summary(step, a.steps, a.top)}
    Path(a.child_out).write_text(json.dumps(out))
    return 0


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.impl:
        return run_one(a)
    from megamm.config import get_preset
    from megamm.data.synthetic import write_synthetic_dataset

    cfg = get_preset(a.model)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or write_synthetic_dataset(Path(tmp) / "data", cfg.vocab, n_train=4000, n_val=8)
        for impl in ("megamm", "hf"):
            out = Path(tmp) / f"{impl}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--data", str(data),
                   "--impl", impl, "--child-out", str(out)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"),
                                                                os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode or not out.is_file():
                print(f"error: {impl} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows[impl] = json.loads(out.read_text())
    result = {
        "benchmark": "profile_step", "model": a.model, "ds_config": a.ds_config, "seq_len": a.seq_len,
        "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "loss_scope": a.loss_scope,
        "steps": a.steps, "warmup_steps": a.warmup_steps, "device": tt.device_name(),
        "load_average_before": os.getloadavg(), "results": rows,
        "versions": {"torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(x) for x in ["python", "benchmarks/profile_step.py", *sys.argv[1:]]),
    }
    for impl, r in rows.items():
        print(f"{impl:>6}: wall {r['wall_ms_per_step']:.1f} ms/step, operators {r['operator_ms_per_step']:.1f}, "
              f"outside {r['outside_operators_ms_per_step']:.1f}; python calls/step {r['python_calls_per_step']:.0f}")
    out = Path(a.out) if a.out else tt.RESULTS / "profile_step.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
