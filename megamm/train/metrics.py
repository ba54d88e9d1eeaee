"""Throughput and model-FLOPs utilisation, and the metrics.jsonl writer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megamm.config import ModelConfig

# dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "A6000": 155e12,
    "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "B200": 2250e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention scores.

    Matmul parameters: the blocks without their norms, plus the output head (the
    embedding is a lookup). Attention: 2 matmuls (QK^T, PV) x 2 flops x seq/2 (causal)
    x d per layer, x3 for forward + backward.
    """
    counts, d = cfg.parameter_counts(), cfg.d_model
    matmul_params = counts["blocks"] - cfg.n_layers * 2 * d + cfg.vocab.padded_size * d
    attention = 3 * cfg.n_layers * 2 * 2 * (seq_len / 2) * d
    return 6 * matmul_params + attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


class MetricsLog:
    """Appends one JSON object per line; appending keeps a resumed run's history."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
