"""On-disk format shared by the tokenizers: `megamm_tokenizer.json` (kind, config,
training report) next to `model.safetensors` (weights). No pickle anywhere, and the
same tokenizer always gives the same bytes (sorted JSON keys, one safetensors
metadata key)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INFO_FILE = "megamm_tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def write_info(directory: Path, kind: str, fields: dict, info_file: str = INFO_FILE) -> None:
    info = {"kind": kind, "format": FORMAT_VERSION, **fields}
    (Path(directory) / info_file).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def read_info(directory: Path, kind: str, info_file: str = INFO_FILE, what: str = "tokenizer") -> dict:
    """The info file of a saved `what` (a tokenizer; the judges share the format)."""
    path = Path(directory) / info_file
    if not path.is_file():
        raise FileNotFoundError(f"no {info_file} in {directory} (not a saved megamm {what})")
    info = json.loads(path.read_text())
    if info.get("kind") != kind:
        raise ValueError(f"{path}: holds a {info.get('kind')!r} {what}, expected {kind!r}")
    if info.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {info.get('format')} is not the supported {FORMAT_VERSION}")
    return info


def save_weights(directory: Path, module: torch.nn.Module) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in sorted(module.state_dict().items())}
    save_file(state, str(Path(directory) / WEIGHTS_FILE))


def load_weights(directory: Path, module: torch.nn.Module) -> None:
    module.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), strict=True)
