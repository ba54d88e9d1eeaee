"""On-disk format of a judge: `megamm_judge.json` (kind, format, config, training
report) next to `model.safetensors` (weights, written by megamm.tokenizers.io). No
pickle; sorted JSON keys, so the same judge always gives the same bytes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megamm.tokenizers.io import load_weights, save_weights

INFO_FILE = "megamm_judge.json"
FORMAT_VERSION = 1


def save_judge(directory: str | Path, kind: str, config: dict, report: dict, module: torch.nn.Module) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory, module)
    info = {"kind": kind, "format": FORMAT_VERSION, "config": config, "report": report}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def read_judge_info(directory: str | Path, kind: str) -> dict:
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {INFO_FILE} in {directory} (not a saved megamm judge)")
    info = json.loads(path.read_text())
    if info.get("kind") != kind:
        raise ValueError(f"{path}: holds a {info.get('kind')!r} judge, expected {kind!r}")
    if info.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {info.get('format')} is not the supported {FORMAT_VERSION}")
    return info


def load_judge_weights(directory: str | Path, module: torch.nn.Module) -> None:
    load_weights(Path(directory), module)
