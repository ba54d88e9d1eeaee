"""Learning-rate schedules (one definition for the trainer and the tokenizer trainers)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int = 50, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay from 1 to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
