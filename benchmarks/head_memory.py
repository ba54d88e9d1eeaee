#!/usr/bin/env python
"""The loss head's peak extra memory, forward + backward, at the 8b preset's vocabulary,
before (benchmarks/head_reference.py) and after (megamm.model.loss, chunked); and the
head's throughput at the tiny and small presets' shapes, old and new interleaved.

    python benchmarks/head_memory.py [--d-model 256] [--skip-before-8192] [--out FILE]
    python benchmarks/head_memory.py --device cuda [--dtype bfloat16]   # on a GPU: 8b's d_model

Memory: every (head, case) runs in a fresh child process that builds h [N, D] and the
table [V, D] (fp32), runs both heads' code once on 256 positions (lazy buffers), then
resets its peak resident set (`echo 5 > /proc/self/clear_refs`) and runs one forward +
backward. Peak extra = VmHWM - VmRSS before the step - the bytes of d h and d weight (the
gradients any head must produce): what the head needs beyond its inputs and outputs. A
resident-set peak counts what the process really held (allocator slack included); the
logits' share does not depend on D, which only keeps the matmuls affordable on a CPU.
Cases: 2,048 and 8,192 text positions, and an 8,192-position row of text -> image
documents (1,024-code images); the tensor-parallel head (tp = 2, gloo, one child per rank)
at 2,048 text positions, the peak of the larger rank.

Throughput: the head alone (grammar_loss forward + backward) on packed synthetic
documents at each preset's d_model and vocabulary and the shapes of the recorded
train_throughput runs, old and new alternating (A, B, A, B, ...) in one process so that
background load hits both alike; the median CPU time (one thread, time.thread_time) of
each, so other processes' load does not count. Also the new head's forward without
gradients: about what a recomputing backward would add.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import head_reference  # noqa: E402

from megamm.config import get_preset  # noqa: E402
from megamm.data.synthetic import synthetic_document  # noqa: E402
from megamm.model.loss import GrammarTables, grammar_loss  # noqa: E402
from megamm.vocab import Vocab  # noqa: E402

HEADS = {"before": (head_reference.grammar_loss, head_reference.GrammarTables),
         "after": (grammar_loss, GrammarTables)}
CASES = {"text-2048": ("text", 2048), "text-8192": ("text", 8192), "image-8192": ("image", 8192)}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def case_row(v: Vocab, kind: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets) [n]: one text document (kind "text") or text -> image documents."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < n + 1:
        text = rng.integers(0, v.cfg.text_size, n if kind == "text" else 30)
        segs = [v.text_segment(text)]
        if kind == "image":
            segs.append(v.image_segment(rng.integers(0, v.cfg.image_codes, v.cfg.image_tokens)))
        ids += v.document(segs)
    row = torch.tensor(ids[: n + 1])
    return row[:-1], row[1:]


def packed_rows(v: Vocab, batch: int, seq: int, kind: str, seed: int = 0):
    """(ids, targets) [batch, seq] of packed synthetic documents (megamm.data.synthetic) or text."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < batch * (seq + 1):
        ids += synthetic_document(v, rng) if kind == "synthetic" else v.document(
            [v.text_segment(rng.integers(0, v.cfg.text_size, 400))])
    rows = torch.tensor(ids[: batch * (seq + 1)]).view(batch, seq + 1)
    return rows[:, :-1], rows[:, 1:]


def _step(head: str, h, w, v, states, targets, z_loss, vocab_start=0, group=None, scale=1.0):
    """One forward + backward of `head`, the loss scaled as training scales it (by 1/tokens)."""
    fn, tables_cls = HEADS[head]
    loss, stats = fn(h, w, vocab_start, states, targets, tables_cls(v), "modality", z_loss, group)
    (loss * scale).backward()
    return loss, stats


def worker(head: str, case: str, d_model: int, threads: int, rank: int, world: int, port: int) -> dict:
    """One measured step in this (fresh) process; tensor-parallel when world > 1."""
    torch.set_num_threads(threads)
    group = None
    if world > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    cfg = get_preset("8b")
    v = Vocab(cfg.vocab)
    kind, n = CASES[case]
    x, y = case_row(v, kind, n)
    states = v.states(x)
    g = torch.Generator().manual_seed(0)
    rows = v.size // world
    h = torch.randn(n, d_model, generator=g).requires_grad_(True)
    w = (torch.randn(v.size, d_model, generator=g) * 0.02)[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    for name in HEADS:  # lazy buffers of both heads' code paths
        _step(name, h[:256], w, v, states[:256], y[:256], cfg.z_loss, rank * rows, group)
    h.grad = w.grad = None
    rss = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    loss, _ = _step(head, h, w, v, states, y, cfg.z_loss, rank * rows, group)
    seconds = time.perf_counter() - t0
    hwm = _status("VmHWM")
    grads = h.grad.nbytes + w.grad.nbytes
    counted = int(v.counted_targets(states, y).sum())
    return {"head": head, "case": case, "rank": rank, "tp": world, "positions": n, "counted": counted,
            "peak_extra_bytes": hwm - rss - grads, "rss_before_bytes": rss, "vmhwm_bytes": hwm,
            "gradient_bytes": grads, "seconds": seconds, "loss": float(loss.detach())}


def cuda_case(head: str, case: str, d_model: int, dtype: torch.dtype) -> dict:
    """One measured forward + backward on the GPU, in this process: peak extra =
    max_memory_allocated during the step - memory_allocated before it - d h and d weight."""
    cfg = get_preset("8b")
    v = Vocab(cfg.vocab)
    kind, n = CASES[case]
    x, y = case_row(v, kind, n)
    dev = torch.device("cuda")
    states, y = v.states(x).to(dev), y.to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d_model, generator=g, device=dev, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v.size, d_model, generator=g, device=dev, dtype=dtype) * 0.02).requires_grad_(True)
    _step(head, h[:256], w, v, states[:256], y[:256], cfg.z_loss)  # lazy buffers, kernels loaded
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss, _ = _step(head, h, w, v, states, y, cfg.z_loss)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grads = h.grad.nbytes + w.grad.nbytes
    out = {"head": head, "case": case, "tp": 1, "positions": n, "dtype": str(dtype).removeprefix("torch."),
           "peak_extra_bytes": torch.cuda.max_memory_allocated() - before - grads, "gradient_bytes": grads,
           "seconds": seconds, "loss": float(loss.detach())}
    del h, w, loss
    torch.cuda.empty_cache()
    return out


def run_cuda(a) -> int:
    """--device cuda: every case, both heads, at the 8b preset's d_model, in bf16."""
    dtype = getattr(torch, a.dtype)
    memory = []
    for case in CASES:
        for head in HEADS:
            memory.append(cuda_case(head, case, a.d_model, dtype))
            print(json.dumps(memory[-1]), flush=True)
    result = {
        "benchmark": "head_memory", "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/head_memory.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
        "vocab": "8b preset (189,440 rows, 151,643 text ids)", "d_model": a.d_model, "dtype": a.dtype,
        "method": "peak extra = max_memory_allocated during one forward + backward - memory_allocated before "
                  "- bytes of d h and d weight",
        "peak_extra_gb": {f"{r['head']}/{r['case']}": round(r["peak_extra_bytes"] / 1e9, 3) for r in memory},
        "memory": memory,
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


def run_case(head: str, case: str, d_model: int, threads: int, world: int = 1) -> dict:
    """Children (one per rank) for one (head, case); the result of the rank with the largest peak."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", head, case, str(d_model), str(threads),
                               str(r), str(world), str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{head} {case} failed ({p.returncode}): {stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return max(out, key=lambda r: r["peak_extra_bytes"])


def throughput(preset: str, batch: int, seq: int, kind: str, steps: int) -> dict:
    """Median seconds of one head forward + backward, old and new alternating."""
    cfg = get_preset(preset)
    v = Vocab(cfg.vocab)
    x, y = packed_rows(v, batch, seq, kind)
    states = v.states(x)
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(batch * seq, cfg.d_model, generator=g)
    w0 = torch.randn(v.size, cfg.d_model, generator=g) * 0.02
    times: dict[str, list[float]] = {"before": [], "after": [], "after_no_grad": []}
    walls: dict[str, list[float]] = {"before": [], "after": []}
    for i in range(steps + 2):  # the first two rounds warm up
        for head in ("before", "after"):
            h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            t0, wall0 = time.thread_time(), time.perf_counter()
            loss, _ = _step(head, h, w, v, states.reshape(-1), y.reshape(-1), cfg.z_loss, scale=1.0 / (batch * seq))
            if i >= 2:
                times[head].append(time.thread_time() - t0)
                walls[head].append(time.perf_counter() - wall0)
            del h, w, loss
        with torch.no_grad():
            t0 = time.thread_time()
            grammar_loss(h0, w0, 0, states, y, GrammarTables(v), "modality", cfg.z_loss)
            if i >= 2:
                times["after_no_grad"].append(time.thread_time() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"preset": preset, "micro_batch": batch, "seq_len": seq, "data": kind, "d_model": cfg.d_model,
            "vocab_rows": v.size, "steps": steps, "median_cpu_s": med,
            "median_wall_s": {k: statistics.median(t) for k, t in walls.items()},
            "tokens_per_cpu_s": {k: batch * seq / med[k] for k in ("before", "after")},
            "after_over_before": med["before"] / med["after"],
            "no_grad_forward_share": med["after_no_grad"] / med["after"]}


def summarize(memory: list[dict], speed: list[dict]) -> dict:
    """Peak extra GB before -> after per case, and new/old throughput per shape."""
    gb: dict[str, dict[str, float]] = {}
    for r in memory:
        key = r["case"] + (f"-tp{r['tp']}" if r["tp"] > 1 else "")
        gb.setdefault(key, {})[r["head"]] = round(r["peak_extra_bytes"] / 1e9, 3)
    return {"peak_extra_gb": gb,
            "throughput_after_over_before": {f"{r['preset']}-{r['micro_batch']}x{r['seq_len']}-{r['data']}":
                                             round(r["after_over_before"], 3) for r in speed}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-before-8192", action="store_true",
                   help="skip the old head at 8,192 positions (about 11 GB)")
    p.add_argument("--throughput-steps", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the peak by torch.cuda.max_memory_allocated, in-process, at --d-model 4096 "
                        "(the 8b preset's) by default, --dtype bfloat16")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the tensors' dtype under --device cuda (the CPU run is fp32)")
    p.add_argument("--out", default=None, help="default benchmarks/results/head_memory-<device>.json")
    a = p.parse_args(argv)
    a.out = a.out or str(ROOT / "benchmarks" / "results" / f"head_memory-{a.device}.json")
    if a.device == "cuda":
        if a.d_model == 256:
            a.d_model = get_preset("8b").d_model
        return run_cuda(a)
    memory = []
    for case in CASES:
        for head in HEADS:
            if head == "before" and case.endswith("8192") and a.skip_before_8192:
                continue
            memory.append(run_case(head, case, a.d_model, a.threads))
            print(json.dumps(memory[-1]), flush=True)
    for head in HEADS:
        memory.append(run_case(head, "text-2048", a.d_model, max(1, a.threads // 2), world=2))
        print(json.dumps(memory[-1]), flush=True)
    torch.set_num_threads(1)  # CPU time of one thread: robust to the machine's other load
    speed = [throughput("tiny", 4, 512, "synthetic", a.throughput_steps),
             throughput("small", 1, 512, "synthetic", a.throughput_steps),
             throughput("small", 1, 2048, "text", a.throughput_steps)]
    for row in speed:
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "head_memory", "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/head_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "vocab": "8b preset (189,440 rows, 151,643 text ids)", "d_model": a.d_model, "dtype": "float32",
        "method": ("peak extra = VmHWM (reset by clear_refs 5 before the step) - VmRSS before the step - "
                   "bytes of d h and d weight; one fresh child process per (head, case), per rank under tp"),
        "summary": summarize(memory, speed), "memory": memory, "throughput": speed,
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))))
    else:
        sys.exit(main())
