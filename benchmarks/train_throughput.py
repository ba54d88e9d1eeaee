#!/usr/bin/env python
"""Training throughput of a preset under a DeepSpeed config, against the baseline a user
would otherwise pick: stock `transformers.LlamaForCausalLM` of the same shapes under the
same DeepSpeed config and batch (benchmarks/hf_baseline.py).

    python benchmarks/train_throughput.py --model tiny --ds_config zero3_offload.json
    python benchmarks/train_throughput.py --model 1b --ds_config zero2.json --gpus 1 --seq-len 2048

One command, one result: it writes a synthetic grammar-valid data set (or takes --data),
then launches each implementation in its own process (`deepspeed --num_gpus N`, or plain
python for one CPU rank) so peak memory is per implementation. Each child reports the
median of its steps after --warmup-steps: tokens/s, TFLOP/s (model FLOPs, the formula of
megamm.train.metrics), MFU (GPU), peak GPU memory, peak host RSS of rank 0; with
`--repeats R` every implementation is launched R times, alternating (the order rotating, so
each goes first in turn), and its median launch kept (one launch each on a busy 2-core
machine has differed by 2x). The result
holds every row and, per loss definition, megamm tokens/s / baseline tokens/s. The two
train the same loss: the baseline's loss is benchmarks/hf_baseline.causal_lm_loss on its
full logits, over the targets megamm counts. `speedup` is the plain softmax over the whole
vocabulary (`full`, what LlamaForCausalLM's own loss computes); `speedup_modality` is
megamm's default grammar loss (the baseline masks the forbidden ids of its full logits;
megamm's head computes only the allowed columns of each position). `--loss-scope` picks
one of the two. `--compile yes` compiles both implementations per block (megamm's --compile;
the baseline's LlamaDecoderLayers the same way, benchmarks/hf_baseline.py), `--compile both`
adds the compiled pairs to the eager ones in the same rotation: `speedup_compiled` and
`speedup_modality_compiled` compare compiled with compiled (the compilation falls in the
warm-up steps). Written to
benchmarks/results/train_throughput-<cpu|cuda>-<model>-<config>[-compile|-compile_both].json.

`--impl megamm|hf` runs one implementation in this process (what the children do).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", default="tiny")
    a("--ds_config", "--ds-config", dest="ds_config", default="zero3_offload.json")
    a("--data", help="token shards (default: a synthetic data set in a temp dir)")
    a("--gpus", type=int, default=1, help="ranks per implementation (deepspeed --num_gpus)")
    a("--seq-len", type=int)
    a("--micro-batch", type=int)
    a("--grad-accum", type=int)
    a("--precision", choices=["bf16", "fp16", "fp32"])
    a("--activation-checkpointing", dest="activation_checkpointing", action="store_const", const=True)
    a("--loss-scope", choices=["full", "modality", "both"], default="both",
      help="the loss both implementations train: full (plain softmax), modality (megamm's grammar "
           "loss), or both (two pairs of rows)")
    a("--tp", type=int, default=1, help="tensor-parallel degree (megamm)")
    a("--pp", type=int, default=1, help="pipeline-parallel degree (megamm; ZeRO 0/1)")
    a("--sequence-parallel", action="store_true")
    a("--compile", choices=["no", "yes", "both"], default="no",
      help="torch.compile each block of both implementations: no, yes, or both (eager and compiled pairs)")
    a("--steps", type=int, default=20)
    a("--repeats", type=int, default=1,
      help="launch every implementation this many times, alternating (the order rotating each round), and "
           "report each one's median run: on a shared or throttling machine one launch each can differ "
           "by more than the implementations do")
    a("--warmup-steps", type=int, default=3)
    a("--seed", type=int, default=1234)
    a("--impls", default="megamm,hf", help="comma-separated: which implementations to run")
    a("--memory-fraction", type=float,
      help="cap each GPU process with torch.cuda.set_per_process_memory_fraction (e.g. 48 GB of 80)")
    a("--out", help="result JSON path (default under benchmarks/results/)")
    a("--impl", choices=["megamm", "hf"], help=argparse.SUPPRESS)
    a("--loss-scope-run", choices=["full", "modality"], help=argparse.SUPPRESS)
    a("--compile-run", action="store_true", help=argparse.SUPPRESS)
    a("--child-out", help=argparse.SUPPRESS)
    a("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


# ---- one implementation, in this process ----------------------------------------------------
def _train_args(a, loss_scope, compile=False):
    from megamm.train.args import TrainArgs

    return TrainArgs(ds_config=a.ds_config, model=a.model, data=a.data, seq_len=a.seq_len,
                     micro_batch=a.micro_batch, grad_accum=a.grad_accum, precision=a.precision,
                     activation_checkpointing=a.activation_checkpointing, loss_scope=loss_scope,
                     max_steps=a.steps, warmup=1, seed=a.seed, progress=False, tp=a.tp, pp=a.pp,
                     sequence_parallel=a.sequence_parallel, compile=compile)


def run_one(a) -> int:
    """Train one implementation; rank 0 writes its summary to --child-out."""
    if a.memory_fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(a.memory_fraction)
    from megamm.train import ds_config, loop
    from megamm.train.memory import peak_rss_bytes
    from megamm.train.metrics import flops_per_token, peak_flops

    args = _train_args(a, a.loss_scope_run, a.compile_run)
    ds_cfg = ds_config.apply_overrides(ds_config.load(a.ds_config), micro_batch=a.micro_batch,
                                       grad_accum=a.grad_accum, precision=a.precision)
    cfg = loop.model_config(args, ds_cfg)
    if a.impl == "megamm":
        records = loop.run(args)
    else:
        import hf_baseline

        from megamm.parallel.distributed import init_distributed

        device = init_distributed()
        records = hf_baseline.train(cfg, ds_cfg, a.data, a.steps, a.seed, device, a.loss_scope_run, a.compile_run)
    if not records:  # not rank 0
        return 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    timed = records[a.warmup_steps:]
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    flops = flops_per_token(cfg, cfg.max_seq_len) * tok_s
    peak = peak_flops(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    summary = {
        "impl": a.impl, "loss_scope": a.loss_scope_run, "compile": a.compile_run,
        "torch_threads": torch.get_num_threads(), "load_average_after": os.getloadavg(),
        "tokens_per_s": tok_s, "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "tflops": flops / 1e12, "mfu": flops / (peak * world) if peak else None,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "peak_host_rss_gb": peak_rss_bytes() / 1e9,
        "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
        "losses": [r["loss"] for r in records],
    }
    Path(a.child_out).write_text(json.dumps(summary))
    return 0


# ---- the driver: data, one process per implementation, the combined result -----------------
def _launch(a, impl, loss_scope, compile, data, out) -> dict:
    own = [x for x in (sys.argv[1:]) if not x.startswith("--local_rank")]
    child = [str(Path(__file__).resolve()), *own, "--data", str(data), "--impl", impl,
             "--loss-scope-run", loss_scope, "--child-out", str(out)] + (["--compile-run"] if compile else [])
    if a.gpus == 1 and not torch.cuda.is_available():
        cmd = [sys.executable, *child]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(a.gpus), *child]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode or not out.is_file():
        raise RuntimeError(f"{impl} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _median_run(runs: list[dict]) -> dict:
    """The launch with the median tokens/s (the lower middle of an even count), with every
    launch's tokens/s beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "tokens_per_s_each_launch": [r["tokens_per_s"] for r in runs]}


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.steps <= a.warmup_steps:
        print(f"error: --steps ({a.steps}) must exceed --warmup-steps ({a.warmup_steps})", file=sys.stderr)
        return 2
    if a.repeats < 1:
        print(f"error: --repeats must be >= 1, got {a.repeats}", file=sys.stderr)
        return 2
    if a.impl:
        return run_one(a)
    from megamm.config import ConfigError, get_preset
    from megamm.data.synthetic import write_synthetic_dataset

    try:
        cfg = get_preset(a.model)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    impls = [x for x in a.impls.split(",") if x]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or write_synthetic_dataset(Path(tmp) / "data", cfg.vocab, n_train=4000, n_val=8)
        scopes = ["full", "modality"] if a.loss_scope == "both" else [a.loss_scope]
        modes = {"no": [False], "yes": [True], "both": [False, True]}[a.compile]
        runs = [(impl, scope, c) for c in modes for scope in scopes for impl in impls]
        launches: dict[tuple, list[dict]] = {run: [] for run in runs}
        for r in range(a.repeats):
            for impl, scope, c in runs[r % len(runs):] + runs[:r % len(runs)]:  # each goes first in turn
                out = Path(tmp) / f"{impl}-{scope}-{'compiled' if c else 'eager'}-{r}.json"
                launches[(impl, scope, c)].append(_launch(a, impl, scope, c, data, out))
    rows = [_median_run(launches[run]) for run in runs]
    by = {(r["impl"], r["loss_scope"], r["compile"]): r for r in rows}

    def ratio(scope, compiled=False):
        mm, hf = by.get(("megamm", scope, compiled)), by.get(("hf", scope, compiled))
        return mm["tokens_per_s"] / hf["tokens_per_s"] if mm and hf else None

    result = {
        "benchmark": "train_throughput",
        "model": a.model, "ds_config": a.ds_config, "device": device_name(), "world_size": a.gpus,
        "seq_len": a.seq_len or cfg.max_seq_len, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
        "precision": a.precision, "steps": a.steps, "warmup_steps": a.warmup_steps, "repeats": a.repeats,
        "compile": a.compile, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": rows,
        "speedup": ratio("full"), "speedup_modality": ratio("modality"),
        "speedup_compiled": ratio("full", True), "speedup_modality_compiled": ratio("modality", True),
        "speedup_definition": "megamm tokens/s / transformers.LlamaForCausalLM tokens/s (each the median of its "
                              "launches), both training the same loss: `speedup` the plain softmax over the whole "
                              "vocabulary, `speedup_modality` megamm's grammar loss (the baseline masks its full "
                              "logits); targets counted alike (not <pad>, not after a document's end); "
                              "`*_compiled`: the same with both implementations compiled per block",
        "versions": {"torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__,
                     "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(x) for x in ["python", "benchmarks/train_throughput.py", *sys.argv[1:]]),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=1))
    for r in rows:
        print(f"{r['impl']:>6} loss={r['loss_scope']:<16} {'compiled' if r['compile'] else 'eager':<8} "
              f"{r['tokens_per_s']:10.1f} tok/s  "
              f"{r['tflops']:.4f} TFLOP/s  host {r['peak_host_rss_gb']:.2f} GB")
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    layout = "" if a.tp == a.pp == 1 else f"-tp{a.tp}pp{a.pp}" + ("sp" if a.sequence_parallel else "")
    layout += {"no": "", "yes": "-compile", "both": "-compile_both"}[a.compile]
    out = Path(a.out) if a.out else RESULTS / f"train_throughput-{kind}-{a.model}-{Path(a.ds_config).stem}{layout}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
