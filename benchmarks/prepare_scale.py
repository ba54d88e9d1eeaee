#!/usr/bin/env python
"""tools/prepare_data.py throughput with 1 and 2 workers, and its peak RSS as the input
grows 10x (streamed input: the peak should stay flat).

    python benchmarks/prepare_scale.py [--lines 1000] [--factor 10] [--out FILE]

The input is a manifest of --lines digits examples (caption + 28x28 image + spoken
caption, megamm.demo.digits.export_manifest, lines repeating its 180 held-out examples),
prepared with the quick default tokenizers; the large input repeats it --factor times.
Each run is a fresh `python tools/prepare_data.py` process that reports its own peak
RSS (VmHWM; worker processes not included). Writes
benchmarks/results/prepare_scale-<cpu>.json.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# runs tools/prepare_data.py in this process's own __main__ (with its __file__, so the worker
# pool's spawned processes import it as multiprocessing expects; runpy.run_path would not)
# and writes the process's own peak RSS at exit
RUN_AND_REPORT_RSS = (
    "import atexit, os, sys\n"
    "from megamm.train.memory import peak_rss_bytes\n"
    "atexit.register(lambda: open(os.environ['MEGAMM_PREP_RSS'], 'w').write(str(peak_rss_bytes())))\n"
    "path = 'tools/prepare_data.py'\n"
    "sys.argv = [path, *sys.argv[1:]]\n"
    "main = sys.modules['__main__']\n"
    "main.__file__ = os.path.abspath(path)\n"
    "exec(compile(open(path).read(), path, 'exec'), main.__dict__)\n")


def manifest(directory: Path, lines: int) -> Path:
    from megamm.demo import digits

    base = digits.export_manifest(directory, split="val")
    examples = base.read_text().splitlines()
    out = directory / f"manifest-{lines}.jsonl"
    out.write_text("\n".join(examples[i % len(examples)] for i in range(lines)) + "\n")
    return out


def run(man: Path, out: Path, tokenizers: Path, workers: int, work: Path) -> dict:
    rss = work / f"{out.name}.rss"
    env = {**os.environ, "MEGAMM_PREP_RSS": str(rss)}
    cmd = [sys.executable, "-c", RUN_AND_REPORT_RSS, str(man), "--out", str(out), "--tokenizers", str(tokenizers),
           "--workers", str(workers), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    lines = sum(1 for _ in open(man))
    return {"lines": lines, "workers": workers, "wall_s": round(seconds, 2),
            "lines_per_s": round(lines / seconds, 1), "peak_rss_mb": round(int(rss.read_text()) / 2**20, 1),
            "summary": proc.stdout.splitlines()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--out")
    a = p.parse_args(argv)
    import torch

    from megamm.demo.recipe import DefaultTokenizerRecipe, ensure_default_tokenizers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizers = ensure_default_tokenizers(tmp / "cache", DefaultTokenizerRecipe.quick(), progress=False)
        small, large = manifest(tmp / "in", a.lines), manifest(tmp / "in", a.lines * a.factor)
        runs = [run(small, tmp / "w1", tokenizers, 1, tmp), run(small, tmp / "w2", tokenizers, 2, tmp),
                run(large, tmp / "big", tokenizers, 1, tmp)]
    result = {
        "benchmark": "prepare_scale", "runs": runs,
        "speedup_2_workers": round(runs[1]["lines_per_s"] / runs[0]["lines_per_s"], 2),
        "peak_rss_ratio_10x_input": round(runs[2]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3),
        "device": f"cpu ({os.cpu_count()} cores)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/prepare_scale.py", *(argv or sys.argv[1:])]),
    }
    print(json.dumps(result, indent=1))
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / "prepare_scale-cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
