"""A run's training curve from its metrics.jsonl (megamm.train.metrics writes it)."""
from __future__ import annotations

import json
import math
from pathlib import Path

SERIES = ("loss", "loss_text", "loss_image", "loss_audio", "val_loss")


def training_curve(metrics: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> {series: [(step, value)] sorted by step} for the finite values of
    SERIES it holds; a resumed run's last record of a step wins, unreadable lines are
    skipped."""
    series: dict[str, dict[int, float]] = {}
    for line in Path(metrics).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k in SERIES:
            if isinstance(r.get(k), (int, float)) and math.isfinite(r[k]):
                series.setdefault(k, {})[int(r["step"])] = float(r[k])
    return {k: sorted(v.items()) for k, v in series.items()}
