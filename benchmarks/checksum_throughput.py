#!/usr/bin/env python
"""What verification costs: CRC-32 throughput of a checkpoint manifest and of a token
shard's checksums, single-threaded, on files in the page cache.

    python benchmarks/checksum_throughput.py [--mib 512]

Writes benchmarks/results/checksum_throughput-<device>.json. Verifying a checkpoint reads
every byte once (split over the ranks); opening a shard reads its .bin once per rank,
as the vocabulary check already did.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megamm.data.shards import ShardReader, ShardWriter
from megamm.checkpoint import manifest


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    args = ap.parse_args(argv)
    n = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "states.pt"
        blob.write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
        manifest_s = best_of(lambda: manifest.file_entry(blob))
        with ShardWriter(Path(tmp) / "train", vocab_size=1 << 20) as w:
            for doc in np.random.default_rng(1).integers(0, 1 << 20, (n // 4 // 4096, 4096)):
                w.add_document(doc)
        shard_s = best_of(lambda: ShardReader(Path(tmp) / "train"))
        plain_s = best_of(lambda: ShardReader(Path(tmp) / "train", verify=False).check_vocab(1 << 20))
    result = {
        "benchmark": "checksum_throughput",
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "bytes": n,
        "manifest_crc32_gb_per_s": n / manifest_s / 1e9,
        "shard_open_verified_gb_per_s": n / shard_s / 1e9,
        "shard_open_vocab_check_only_gb_per_s": n / plain_s / 1e9,
    }
    out = Path(__file__).resolve().parent / "results" / "checksum_throughput-cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
