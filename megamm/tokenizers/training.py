"""Helpers shared by the tokenizer training loops: progress bars, the learning-rate
schedule, and codebook statistics."""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm


def progress_bar(iterable, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"):
    """A tqdm bar on stderr (silent when `enabled` is False)."""
    return tqdm(iterable, desc=desc, disable=not enabled, file=sys.stderr, leave=False, total=total,
                unit=unit, dynamic_ncols=True, mininterval=0.5)


def warmup_cosine(step: int, total: int, warmup: int = 50, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay from 1 to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def code_usage(codes: np.ndarray, codebook_size: int) -> dict:
    """Fraction of codes used at least once in `codes`, and the perplexity of their
    distribution (= codebook_size when all codes are equally frequent)."""
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size)
    p = counts / max(counts.sum(), 1)
    entropy = -float(np.sum(p[p > 0] * np.log(p[p > 0])))
    return {"used_fraction": float((counts > 0).mean()), "perplexity": float(math.exp(entropy))}


@contextmanager
def torch_threads(n: int):
    """Run the block with `n` intra-op torch threads, then restore the previous count.

    Tokenizer training and the default build run single-threaded: the result is then
    bit-identical on every machine, and a busy machine does not stall it (on a shared
    2-core VM, two threads competing with other processes ran 10-20x slower than one).
    Parallelism comes from separate processes instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
