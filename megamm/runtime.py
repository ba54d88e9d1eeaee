"""Process-level helpers shared by the tokenizer trainers, the default-data build and
the tools: progress bars, intra-op thread counts, usable cores."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
from tqdm import tqdm


def progress_bar(iterable, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"):
    """A tqdm bar on stderr (silent when `enabled` is False)."""
    return tqdm(iterable, desc=desc, disable=not enabled, file=sys.stderr, leave=False, total=total,
                unit=unit, dynamic_ncols=True, mininterval=0.5)


@contextmanager
def torch_threads(n: int):
    """Run the block with `n` intra-op torch threads, then restore the previous count.

    Tokenizer training and the default build run single-threaded: the result is then
    bit-identical on every machine, and a busy machine does not stall it (oversubscribed
    intra-op threads crawl when other processes share the cores). Parallelism comes from
    separate processes instead.
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

