"""Codebook statistics shared by the image and audio tokenizer trainers."""
from __future__ import annotations

import math

import numpy as np


def code_usage(codes: np.ndarray, codebook_size: int) -> dict:
    """Fraction of codes used at least once in `codes`, and the perplexity of their
    distribution (= codebook_size when all codes are equally frequent)."""
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size)
    p = counts / max(counts.sum(), 1)
    entropy = -float(np.sum(p[p > 0] * np.log(p[p > 0])))
    return {"used_fraction": float((counts > 0).mean()), "perplexity": float(math.exp(entropy))}
