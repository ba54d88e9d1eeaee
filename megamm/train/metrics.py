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


def flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention scores.

    Attention: 2 matmuls (QK^T, PV) x 2 flops x seq/2 (causal) x d per layer, x3 for
    forward + backward.
    """
    d, hd = cfg.d_model, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim
    matmul_params = cfg.n_layers * per_layer + vocab_size * d  # output head; embedding is a lookup
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


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
