"""Where things are in a save directory, and what megamm.json says about a checkpoint.

    <save_dir>/latest          name of the newest complete checkpoint (replaced atomically)
    <save_dir>/step<N>/        one checkpoint: DeepSpeed's files (megamm.checkpoint.ds knows
                               them), megamm.json, rng_rank<r>.pt, tokenizers/, manifest.json
    <save_dir>/.blobs/         the tokenizer files, once; step<N>/tokenizers/ hard-links them
                               (megamm.checkpoint.blobs)

megamm.json (written by the trainer at every save) records: "model" (ModelConfig.to_dict),
"preset", "data", "tokenizers" (a path relative to the checkpoint, or absolute in old
checkpoints), "zero_stage", "precision", "topology" {"tp", "pp", "dp"},
"sequence_parallel", and "format": "universal" where tools/reshard.py wrote it.

This module reads only JSON and directory listings; it imports nothing of DeepSpeed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from megamm.checkpoint import manifest
from megamm.config import ConfigError

META_FILE = "megamm.json"
LATEST = "latest"
TOKENIZERS_DIR = "tokenizers"
_STEP_DIR = re.compile(r"step(\d+)")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, damaged or unreadable."""


def step_of(name: str) -> int | None:
    """N of a `step<N>` directory name; None for any other name."""
    m = _STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def step_dirs(save_dir) -> list[tuple[int, Path]]:
    """(step, directory) of every `step<N>` directory, oldest first."""
    if not Path(save_dir).is_dir():
        return []
    found = [(step, p) for p in Path(save_dir).iterdir()
             if p.is_dir() and (step := step_of(p.name)) is not None]
    return sorted(found)


def has_latest(save_dir) -> bool:
    """Whether save_dir (may be None) has a `latest` file naming a checkpoint."""
    return save_dir is not None and (Path(save_dir) / LATEST).is_file()


def latest_tag(save_dir) -> str:
    """The tag `<save_dir>/latest` names; CheckpointError when there is none or its
    directory is missing."""
    save_dir = Path(save_dir)
    f = save_dir / LATEST
    if not f.is_file():
        raise CheckpointError(f"no checkpoint in {save_dir}: {f} does not exist")
    tag = f.read_text().strip()
    if not (save_dir / tag).is_dir():
        raise CheckpointError(f"{f} names {tag!r} but {save_dir / tag} is missing")
    return tag


def checkpoint_dir(path) -> Path:
    """A save dir (with `latest`) or one checkpoint dir -> the checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / META_FILE).is_file() or (path / manifest.FILE).is_file():
        return path
    if (path / LATEST).is_file():
        return path / latest_tag(path)
    raise CheckpointError(f"{path} is not a megamm checkpoint (no {META_FILE} and no {LATEST})")


def read_meta(ckpt) -> dict:
    """megamm.json of checkpoint directory `ckpt`."""
    try:
        return json.loads((Path(ckpt) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(ckpt) / META_FILE}: unreadable ({e})") from None


def tokenizers_dir(ckpt, meta: dict | None = None) -> Path | None:
    """The tokenizers of a checkpoint: its own copy (a path relative to it), or — in
    checkpoints from before they carried one — the absolute path it recorded."""
    meta = read_meta(ckpt) if meta is None else meta
    tok = meta.get("tokenizers")
    if not tok:
        return None
    return Path(tok) if Path(tok).is_absolute() else Path(ckpt) / tok


def verified_checkpoint_dir(path) -> Path:
    """checkpoint_dir(path), refused with a one-line CheckpointError unless it is intact."""
    ckpt = checkpoint_dir(path)
    problem = manifest.verify(ckpt)
    if problem:
        raise CheckpointError(f"damaged checkpoint {ckpt}: {problem}")
    return ckpt
