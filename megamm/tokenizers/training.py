"""Helpers shared by the tokenizer training loops: progress bars, the learning-rate
schedule, and codebook statistics."""
from __future__ import annotations

import math
import sys

import numpy as np
from tqdm import tqdm


def progress_bar(iterable, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (silent when `enabled` is False)."""
    return tqdm(iterable, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=0.5)


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
