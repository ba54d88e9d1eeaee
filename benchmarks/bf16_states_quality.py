#!/usr/bin/env python
"""The training-quality cost of 16-bit master weights and optimizer states: the same run
of the `small` model on the embedded default data set twice, same seed and data order,
under ds_configs/zero3_offload.json as shipped (bf16 compute, bf16_master_weights_and_grads
+ bf16_optimizer_states) and with those two keys removed (bf16 compute, fp32 master
weights and fp32 Adam moments).

    python benchmarks/bf16_states_quality.py [--steps 40] [--seq-len 128] [--micro-batch 4]

The embedded data set is tokenised with the default (tiny-sized) vocabulary, which the
`small` preset's 45K-id vocabulary does not match; the model is therefore `small`'s
transformer body (12 layers, d=768, 12 heads / 4 KV heads, FFN 2048) with the data's
vocabulary, registered for this benchmark's child processes only as preset
"small-digits". Each variant trains in its own process (`python launch/train.py`'s
code path, one CPU rank). Writes benchmarks/results/bf16_states_quality-<cpu|cuda>.json
and a PNG of both variants' training loss (a moving mean) and held-out loss (every
--eval-interval steps) (megamm.demo.pictures; `--out` chooses the JSON path).
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
RESULTS = ROOT / "benchmarks" / "results"
PRESET = "small-digits"
BF16_STATE_KEYS = ("bf16_master_weights_and_grads", "bf16_optimizer_states")
CHILD = r"""
import json, runpy, sys
from unittest import mock
from megamm import config
from megamm.demo.recipe import ensure_default_dataset
vocab = json.loads((ensure_default_dataset() / "meta.json").read_text())["vocab"]
body = config.get_preset("small").replace(vocab=config.VocabConfig(**vocab))
with mock.patch.dict(config.PRESETS, {"%s": body}):
    sys.argv = ["launch/train.py", *sys.argv[1:]]
    runpy.run_path("launch/train.py", run_name="__main__")
""" % PRESET


def run_variant(name: str, ds_cfg: dict, a, tmp: Path) -> list[dict]:
    cfg_path, save = tmp / f"{name}.json", tmp / name
    cfg_path.write_text(json.dumps(ds_cfg))
    argv = ["--ds_config", str(cfg_path), "--model", PRESET, "--seq-len", a.seq_len, "--micro-batch", a.micro_batch,
            "--grad-accum", 1, "--lr", a.lr, "--warmup", a.warmup, "--max-steps", a.steps, "--seed", a.seed,
            "--save-dir", save, "--no-progress", "--no-final-eval", "--eval-interval", a.eval_interval,
            "--eval-batches", a.eval_batches]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def smoothed(recs: list[dict], window: int) -> list[tuple[int, float]]:
    """(step, mean training loss of the `window` steps up to it), from the window-th step on."""
    losses = [r["loss"] for r in recs]
    return [(recs[i]["step"], sum(losses[i + 1 - window: i + 1]) / window) for i in range(window - 1, len(recs))]


def held_out(recs: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]


def plot(curves: dict[str, list[dict]], path: Path, title: str, window: int) -> None:
    from megamm.demo.pictures import line_plot
    from megamm.media import write_png

    series = {}
    for name, recs in curves.items():
        short = name.split(" (")[0]
        series[f"{short}: train, mean of {window} steps"] = smoothed(recs, window)
        series[f"{short}: held-out"] = held_out(recs)
    write_png(path, line_plot(series, title=title, xlabel="optimizer step", ylabel="loss (modality grammar)",
                              size=(760, 440)))


def main(argv=None) -> int:
    import deepspeed
    import torch

    from megamm.demo.recipe import ensure_default_dataset
    from megamm.train import ds_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-interval", type=int, default=25, help="held-out loss every N steps")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--window", type=int, default=25, help="steps per point of the smoothed training curve")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/"
                   "bf16_states_quality-<cpu|cuda>.json); the PNG goes next to it")
    a = p.parse_args(argv)
    ensure_default_dataset()  # built once, before the children race for it
    shipped = ds_config.load("zero3_offload.json")
    fp32_states = json.loads(json.dumps(shipped))
    for key in BF16_STATE_KEYS:
        fp32_states["bf16"].pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        curves = {"bf16 master + bf16 Adam states (zero3_offload.json)": run_variant("bf16_states", shipped, a, Path(tmp)),
                  "fp32 master + fp32 Adam states": run_variant("fp32_states", fp32_states, a, Path(tmp))}
    (bf, fp) = curves.values()
    tail = max(1, len(bf) // 4)
    vals = {name: held_out(recs) for name, recs in curves.items()}
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "bf16_states_quality",
        "model": f"{PRESET}: small's body with the embedded data's vocabulary",
        "data": str(ensure_default_dataset()), "ds_config": "zero3_offload.json (bf16 compute, ZeRO-3, CPU offload)",
        "seq_len": a.seq_len, "micro_batch": a.micro_batch, "grad_accum": 1, "steps": a.steps, "lr": a.lr,
        "warmup": a.warmup, "seed": a.seed, "eval_interval": a.eval_interval, "eval_batches": a.eval_batches,
        "loss": {name: [r["loss"] for r in recs] for name, recs in curves.items()},
        "final_loss_mean_last_quarter": {name: sum(r["loss"] for r in recs[-tail:]) / tail
                                         for name, recs in curves.items()},
        "max_abs_loss_gap": max(abs(x["loss"] - y["loss"]) for x, y in zip(bf, fp)),
        "val_loss": vals,
        "final_val_loss": {name: v[-1][1] for name, v in vals.items() if v},
        "max_abs_val_loss_gap": max((abs(x[1] - y[1]) for x, y in zip(*vals.values())), default=None),
        "device": torch.cuda.get_device_name(0) if kind == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/bf16_states_quality.py", *(argv or sys.argv[1:])]),
    }
    out = a.out or RESULTS / f"bf16_states_quality-{kind}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(curves, out.with_suffix(".png"),
         f"{PRESET}, seq {a.seq_len} x micro-batch {a.micro_batch}, lr {a.lr}, seed {a.seed}, {kind}", a.window)
    print(json.dumps({k: result[k] for k in ("final_loss_mean_last_quarter", "max_abs_loss_gap", "final_val_loss",
                                             "max_abs_val_loss_gap")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
