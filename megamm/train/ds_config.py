"""Loading a DeepSpeed JSON config and applying the command line's overrides to it.

A bare name (`zero3_offload.json` or `zero3_offload`) resolves against the bundled
configs, DS_CONFIG_DIR: the repository's ds_configs/, which setup.py installs as the
package data `megamm.ds_configs`, so it is megamm/ds_configs/ in an installed megamm and
ds_configs/ beside the megamm package in a source checkout (editable installs included).
A path is used as given. CLI flags win over the file.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from megamm.config import ConfigError


def _bundled_dir() -> Path:
    package = Path(__file__).resolve().parents[1]
    installed = package / "ds_configs"
    return installed if installed.is_dir() else package.parent / "ds_configs"


DS_CONFIG_DIR = _bundled_dir()


class DSConfigError(ConfigError):
    """A DeepSpeed config that is missing, malformed or impossible."""


def resolve_path(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    if p.parent == Path("."):
        for cand in (DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"):
            if cand.is_file():
                return cand
    known = ", ".join(sorted(q.name for q in DS_CONFIG_DIR.glob("*.json"))) or "none"
    raise DSConfigError(f"DeepSpeed config not found: {name} (bundled configs: {known})")


def load(name: str) -> dict:
    path = resolve_path(name)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise DSConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DSConfigError(f"{path}: zero_optimization.stage must be 0-3, got {stage!r}")
    return cfg


def apply_overrides(cfg: dict, *, micro_batch=None, grad_accum=None, lr=None, precision=None) -> dict:
    """A copy of cfg with the given CLI values written in."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("train_batch_size", None)  # DeepSpeed derives it from micro batch x accum x dp
    if micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    if grad_accum is not None:
        cfg["gradient_accumulation_steps"] = int(grad_accum)
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    cfg.setdefault("gradient_accumulation_steps", 1)
    if lr is not None:
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = float(lr)
    if precision is not None:
        if precision not in ("bf16", "fp16", "fp32"):
            raise DSConfigError(f"--precision must be bf16, fp16 or fp32, got {precision!r}")
        # bf16 keeps the file's bf16 options (bf16_master_weights_and_grads,
        # bf16_optimizer_states); fp32/fp16 drop them: they only exist under bf16.
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": True} if precision == "bf16" else {"enabled": False}
        fp16 = dict(cfg.get("fp16", {}))
        fp16["enabled"] = precision == "fp16"
        cfg["fp16"] = fp16
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def precision(cfg: dict) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def offload(cfg: dict) -> str:
    z = cfg.get("zero_optimization", {})
    parts = [f"{k.split('_')[1]}->{z[k].get('device')}" for k in ("offload_param", "offload_optimizer")
             if z.get(k, {}).get("device", "none") != "none"]
    return ", ".join(parts) or "none"
