#!/usr/bin/env python
"""The loader at scale: start-up time, first-batch time and anonymous memory of one rank's
PackedLoader over synthetic shards of 1M, 10M (and 100M) documents, with a cold cache
(first open: every shard read in full and stamped, the packing plan built) and a warm one.

    nice -n 19 python benchmarks/loader_scale.py [--docs 1000000 10000000] [--dir /tmp/loader_scale]
        [--lengths 20 200] [--short-from 100000000 --short-lengths 10 30] [--old REV]

Each measurement runs in a fresh subprocess (one rank: `--dp` ranks, rank 0 measured) that
reads RssAnon and VmHWM from /proc/self/status after its first batch; start-up is
open_split + PackedLoader, after the imports. The shards are written straight from numpy
(ShardWriter.add_documents, 1M documents a shard); document lengths are uniform in
--lengths, or --short-lengths from --short-from documents on (100M documents of 20-200
tokens would be 44 GB). "Cold" is the loader's cache, not the page cache: the shards were
just written. --old REV measures the loader of git revision REV (its megamm/ from `git
archive`) on the same shards (up to --old-up-to documents) and records whether its first
batch is the same. Writes benchmarks/results/loader_scale.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS_PER_SHARD = 1_000_000
TEXT_SIZE = 32_000

MEASURE = r"""
import json, sys, time
t0 = time.perf_counter()
from megamm.config import VocabConfig
from megamm.data.loader import PackedLoader, open_split
from megamm.vocab import Vocab
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "VmHWM", "RssFile"):
            out[k] = int(v.split()[0]) / 1024  # MiB
    return out
a = json.loads(sys.argv[1])
vocab = Vocab(VocabConfig(text_size=a["text_size"], n_special=10, image_codes=64, image_tokens=4,
                          audio_codebooks=2, audio_codebook_size=64))
t1 = time.perf_counter(); base = status()
shards = open_split(a["data"], "train", vocab)
t2 = time.perf_counter()
loader = PackedLoader(shards, vocab, a["seq_len"], a["micro_batch"], 0, a["dp"], seed=1)
t3 = time.perf_counter()
x, y = loader.next_batch()
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "plan_s": t3 - t2, "startup_s": t3 - t1,
                  "first_batch_s": t4 - t3, "rss_after_imports_mib": base, "rss_mib": status(),
                  "rows_per_epoch": loader.steps_per_epoch() * loader.rows_per_step,
                  "batch_sum": int(x.sum())}))
"""


def write_shards(directory: Path, n_docs: int, lengths: tuple[int, int], seed: int = 0) -> dict:
    from megamm.data.shards import ShardWriter

    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    t0, n_tokens = time.perf_counter(), 0
    for s, lo in enumerate(range(0, n_docs, DOCS_PER_SHARD)):
        n = min(DOCS_PER_SHARD, n_docs - lo)
        with ShardWriter(directory / f"train_{s:05d}", vocab_size=TEXT_SIZE) as w:
            for c in range(0, n, 250_000):  # ~110 MB of tokens at a time
                m = min(250_000, n - c)
                lens = rng.integers(lengths[0], lengths[1] + 1, m)
                w.add_documents(rng.integers(0, TEXT_SIZE, int(lens.sum()), dtype=np.uint32), lens)
                n_tokens += int(lens.sum())
    return {"write_s": time.perf_counter() - t0, "shards": -(-n_docs // DOCS_PER_SHARD), "tokens": n_tokens,
            "bytes": sum(p.stat().st_size for p in directory.glob("train_*"))}


def measure(data: Path, args, pythonpath: Path = ROOT) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    a = {"data": str(data), "seq_len": args.seq_len, "micro_batch": args.micro_batch, "dp": args.dp,
         "text_size": TEXT_SIZE}
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(a)], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if proc.returncode:
        raise SystemExit(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cache_size(data: Path) -> dict:
    cache = data / ".cache"
    plans = list(cache.glob("plan-*"))
    return {"plan_files": len(plans), "plan_bytes": sum(p.stat().st_size for p in plans),
            "stamp_bytes": sum(p.stat().st_size for p in (cache / "verified").glob("*.json"))}


def old_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "megamm"], cwd=ROOT, capture_output=True, check=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    archive_path = into / "old.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as t:
        t.extractall(into, filter="data")
    return into


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "loader_scale")
    ap.add_argument("--lengths", type=int, nargs=2, default=[20, 200])
    ap.add_argument("--short-from", type=int, default=100_000_000)
    ap.add_argument("--short-lengths", type=int, nargs=2, default=[10, 30])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--warm-repeats", type=int, default=3)
    ap.add_argument("--old", default=None, help="also measure the loader of this git revision")
    ap.add_argument("--old-up-to", type=int, default=10_000_000, help="... at sizes up to this many documents")
    ap.add_argument("--keep", action="store_true", help="keep the shards (default: removed after each size)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loader_scale.json")
    args = ap.parse_args(argv)
    old = old_tree(args.old, args.dir / "old_tree") if args.old else None
    sizes = []
    for n in args.docs:
        data = args.dir / f"docs{n}"
        shutil.rmtree(data, ignore_errors=True)
        lengths = tuple(args.short_lengths if n >= args.short_from else args.lengths)
        print(f"{n:,} documents of {lengths[0]}-{lengths[1]} tokens: writing ...", flush=True)
        row = {"docs": n, "doc_lengths": list(lengths), **write_shards(data, n, lengths)}
        print(f"  wrote {row['bytes'] / 2**30:.2f} GiB in {row['write_s']:.1f} s; cold start ...", flush=True)
        row["cold"] = measure(data, args)
        row["cache"] = cache_size(data)
        warm = [measure(data, args) for _ in range(args.warm_repeats)]
        row["warm"] = min(warm, key=lambda r: r["startup_s"])
        row["warm_startup_s_all"] = [r["startup_s"] for r in warm]
        assert len({r["batch_sum"] for r in [row["cold"], *warm]}) == 1, "batches differ between starts"
        if old is not None and n <= args.old_up_to:
            print("  the old loader ...", flush=True)
            row["old"] = measure(data, args, old)
            row["same_first_batch_as_old"] = row["old"]["batch_sum"] == row["warm"]["batch_sum"]
        sizes.append(row)
        print(f"  cold start {row['cold']['startup_s']:.2f} s (open {row['cold']['open_s']:.2f}, plan "
              f"{row['cold']['plan_s']:.2f}); warm start {row['warm']['startup_s']:.3f} s, first batch "
              f"{row['warm']['first_batch_s']:.3f} s, RssAnon {row['warm']['rss_mib']['RssAnon']:.0f} MiB"
              + (f"; old: start {row['old']['startup_s']:.2f} s, RssAnon {row['old']['rss_mib']['RssAnon']:.0f} MiB"
                 if "old" in row else ""), flush=True)
        if not args.keep:
            shutil.rmtree(data)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    out = {"benchmark": "loader_scale", "date": datetime.date.today().isoformat(),
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "device": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
           "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
           "settings": {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "dp": args.dp,
                        "docs_per_shard": DOCS_PER_SHARD, "old_revision": args.old},
           "sizes": sizes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
