"""Saving and resuming a live engine: checkpoints that never lose data, prove they are
intact, and load without running code from their files. (The save directory's layout,
megamm.json and reading a checkpoint into a plain model: megamm.checkpoint.)

Save protocol. Every rank runs every stage, and a rank whose write fails records the
error instead of raising it, so every rank reaches every collective (DeepSpeed's
barriers inside save_checkpoint included) and no rank waits forever for one that
gave up. Each stage ends by agreeing: all ranks gather their errors, and if any rank
failed, rank 0 removes `.partial-step<N>/` and every rank raises the same
CheckpointSaveError, naming the path; `latest` and its directory are untouched.
  1. rank 0 creates `<save_dir>/.partial-step<N>/` (clearing debris of a killed save);
  2. every rank writes its part into it (DeepSpeed's files through the engine's
     checkpoint engine, rng_rank<r>.pt; rank 0 also megamm.json);
  3. the files are split over the ranks; each fsyncs its share and reads it back for
     its size and CRC-32 (manifest.py);
  4. rank 0 writes manifest.json last, renames the directory to `step<N>` and then
     atomically points `latest` at it;
  5. with keep_last=K, the new checkpoint is verified against its manifest (read back
     in full, split over the ranks), and only then are all but the K newest
     checkpoints deleted.
A save killed at any moment leaves the previous `latest` and its directory untouched.

Resume verifies before it loads: `latest` first, then older `step<N>` directories,
newest first; damaged ones are skipped with one warning line naming them. Loading
runs under refusing_unsafe_pickles (megamm.checkpoint.ds).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megamm.checkpoint import blobs, ds, manifest
from megamm.checkpoint.ds import hooks
from megamm.checkpoint.layout import (LATEST, META_FILE, TOKENIZERS_DIR, CheckpointError, has_latest, step_dirs,
                                      step_of)

__all__ = ["CheckpointError", "CheckpointSaveError", "has_latest", "pick_for_resume", "pick_intact", "resume",
           "save", "step_dirs"]


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank; every rank raises it with the same message."""


# ---- collectives that every rank reaches --------------------------------------------------
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(obj) -> list:
    """obj of every rank, in rank order (a collective when distributed)."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None) -> str | None:
    """The first rank's error (or None), returned to every rank."""
    return next((e for e in _gather(error) if e), None)


# ---- files ---------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loads with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- saving --------------------------------------------------------------------------------
def save(engine, save_dir, step: int, client_state: dict, meta: dict, rank: int, keep_last: int = 0) -> Path:
    """Save engine state + client_state as `step<step>`; returns the final directory.
    Raises CheckpointSaveError (on every rank) if any rank could not write its part."""
    save_dir = Path(save_dir)
    tag = f"step{step}"
    tmp_dir, final_dir = save_dir / f".partial-{tag}", save_dir / tag

    def fail_if(error: str | None) -> None:
        if error is None:
            return
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        prev = (save_dir / LATEST).read_text().strip() if (save_dir / LATEST).is_file() else None
        raise CheckpointSaveError(f"could not save checkpoint {tag} to {tmp_dir}: {error} "
                                  f"({f'{prev} is still the latest checkpoint' if prev else 'no checkpoint was kept'})")

    def make_room():
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # debris of a killed save
        tmp_dir.mkdir()

    fail_if(_agree(hooks.attempt(make_room) if rank == 0 else None))

    failures: list[str] = []
    with hooks.recording_write_failures(engine, failures):
        engine.save_checkpoint(str(save_dir), tag=tmp_dir.name, client_state=client_state, save_latest=False)
    if not failures:
        error = hooks.attempt(lambda: torch.save(rng_state(), tmp_dir / f"rng_rank{rank}.pt"))
        if error is None and rank == 0:
            error = hooks.attempt(lambda: _write_meta(tmp_dir, meta))
        failures += [error] if error else []
    fail_if(_agree(failures[0] if failures else None))

    files = _gather(manifest.list_files(tmp_dir) if rank == 0 else None)[0]  # one listing for all
    entries: dict[str, dict] = {}
    error = hooks.attempt(lambda: entries.update(manifest.entries(tmp_dir, manifest.share(files, rank, _world()),
                                                             fsync=True)))
    gathered = _gather((error, entries))
    fail_if(next((e for e, _ in gathered if e), None))

    def publish():
        manifest.write(tmp_dir, {k: v for _, part in gathered for k, v in part.items()})
        old = save_dir / f".old-{tag}"
        if final_dir.exists():  # re-saving a step (e.g. after a resume): keep it until the swap
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        _write_atomic(save_dir / LATEST, tag)
        shutil.rmtree(old, ignore_errors=True)

    fail_if(_agree(hooks.attempt(publish) if rank == 0 else None))
    if keep_last:
        _prune(save_dir, step, keep_last, rank)
    return final_dir


def _write_meta(ckpt: Path, meta: dict) -> None:
    """megamm.json; the tokenizers it names are put in beside it (`tokenizers/`), so the
    checkpoint directory alone is enough to generate and evaluate anywhere. Their files
    are hard links into the save directory's blob store (megamm.checkpoint.blobs): one
    copy per save directory, however many steps it keeps."""
    src = meta.get("tokenizers")
    if src and Path(src).is_absolute() and Path(src).is_dir():
        blobs.link_tree(Path(src), ckpt / TOKENIZERS_DIR, ckpt.parent)
        meta = {**meta, "tokenizers": TOKENIZERS_DIR, "tokenizers_source": str(src)}
    (ckpt / META_FILE).write_text(json.dumps(meta, indent=1))


def _prune(save_dir: Path, step: int, keep_last: int, rank: int) -> None:
    """Delete all but the keep_last newest checkpoints up to `step`, once `step<step>` verifies."""
    older = [p for s, p in step_dirs(save_dir) if s < step] if rank == 0 else []
    doomed = _gather(older[:max(0, len(older) - (keep_last - 1))])[0]  # rank 0's listing decides for all
    if not doomed:
        return
    problem = _verify_together(save_dir / f"step{step}", rank)
    if problem:
        raise CheckpointSaveError(f"checkpoint {save_dir / f'step{step}'} does not verify right after saving "
                                  f"({problem}); no older checkpoint was deleted")
    if rank == 0:
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        blobs.prune(save_dir)


# ---- verifying and resuming ----------------------------------------------------------------
def _verify_together(ckpt: Path, rank: int) -> str | None:
    """manifest.verify with the reading split over the ranks; every rank gets the answer."""
    try:
        recorded = manifest.read(ckpt)
        problem = manifest.check_listing(ckpt, recorded) or \
            manifest.check_contents(ckpt, recorded, manifest.share(sorted(recorded), rank, _world()))
    except ValueError as e:
        problem = str(e)
    except OSError as e:
        problem = hooks.one_line(e)
    return _agree(problem)


def _candidates(save_dir: Path) -> list[str]:
    """Tags to try, best first: what `latest` names, then older step<N>, newest first."""
    dirs = step_dirs(save_dir)
    latest_file = save_dir / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    if latest is None and not dirs:
        raise CheckpointError(f"no checkpoint to resume from: {latest_file} does not exist")
    newest = step_of(latest or "")
    if newest is None:
        return [p.name for _, p in reversed(dirs)]
    return [latest] + [p.name for s, p in reversed(dirs) if s < newest]


def pick_intact(save_dir, rank: int) -> tuple[str, list[str]]:
    """(tag of the newest intact checkpoint, ["<tag> (<problem>)" of each one skipped])."""
    save_dir = Path(save_dir)
    candidates = _gather(_candidates(save_dir) if rank == 0 else None)[0]
    skipped = []
    for tag in candidates:
        problem = _verify_together(save_dir / tag, rank) if (save_dir / tag).is_dir() else "directory missing"
        if problem is None:
            return tag, skipped
        skipped.append(f"{tag} ({problem})")
    raise CheckpointError(f"no intact checkpoint in {save_dir}: " + "; ".join(skipped))


def pick_for_resume(save_dir, rank: int) -> str:
    """pick_intact's tag, with one warning line (rank 0) naming the checkpoints skipped."""
    save_dir = Path(save_dir)
    tag, skipped = pick_intact(save_dir, rank)
    if skipped and rank == 0:
        print(f"warning: skipped damaged checkpoint(s) {', '.join(skipped)}; resuming from {save_dir / tag}",
              file=sys.stderr, flush=True)
    return tag


def resume(engine, save_dir, rank: int, tag: str | None = None) -> dict:
    """Load checkpoint `tag` (default: the newest intact one, pick_for_resume) of save_dir
    into engine; returns its client state."""
    save_dir = Path(save_dir)
    tag = tag or pick_for_resume(save_dir, rank)
    with ds.refusing_unsafe_pickles(save_dir / tag):
        path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {save_dir / tag}")
        rng_file = save_dir / tag / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state or {}
