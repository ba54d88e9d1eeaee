"""On-disk format of a judge: `megamm_judge.json` (kind, format, config, training
report) next to `model.safetensors` (weights, written by megamm.tokenizers.io). No
pickle; sorted JSON keys, so the same judge always gives the same bytes."""
from __future__ import annotations

from pathlib import Path

import torch

from megamm.tokenizers.io import load_weights, read_info, save_weights, write_info

INFO_FILE = "megamm_judge.json"


def save_judge(directory: str | Path, kind: str, config: dict, report: dict, module: torch.nn.Module) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory, module)
    write_info(directory, kind, {"config": config, "report": report}, info_file=INFO_FILE)


def read_judge_info(directory: str | Path, kind: str) -> dict:
    return read_info(Path(directory), kind, info_file=INFO_FILE, what="judge")


def load_judge_weights(directory: str | Path, module: torch.nn.Module) -> None:
    load_weights(Path(directory), module)
