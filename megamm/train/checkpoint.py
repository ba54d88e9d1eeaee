"""Checkpoints that never lose data, prove they are intact, and load without running
code from their files; loading one into a plain model.

Layout of a save directory:

    <save_dir>/latest          name of the newest complete checkpoint (replaced atomically)
    <save_dir>/step<N>/        DeepSpeed's files + megamm.json + rng_rank<r>.pt + manifest.json
                               (DeepSpeed's universal layout when tools/reshard.py wrote it:
                               megamm/train/universal.py)

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
runs under safe_load.refusing_unsafe_pickles. `load_model` verifies too and refuses a
damaged checkpoint with a one-line error (no fallback: it loads what it was given).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from megamm.config import ConfigError, ModelConfig
from megamm.parallel.tensor_parallel import merge_shards
from megamm.train import manifest, universal
from megamm.train.safe_load import refusing_unsafe_pickles

META_FILE = "megamm.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"step(\d+)")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, damaged or unreadable."""


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank; every rank raises it with the same message."""


# ---- collectives that every rank reaches --------------------------------------------------
def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(obj) -> list:
    """obj of every rank, in rank order (a collective when distributed)."""
    if _world() == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None) -> str | None:
    """The first rank's error (or None), returned to every rank."""
    return next((e for e in _gather(error) if e), None)


def _attempt(fn) -> str | None:
    """Run fn; its failure as one line (None if it succeeded)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any failure to write is a failed save, reported in one line
        return _one_line(e)
    return None


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextmanager
def _recording_write_failures(engine, failures: list[str]):
    """Within the block, a failed write inside DeepSpeed's save_checkpoint (its checkpoint
    engine's `save(state, path)`, its `_copy_recovery_script(dir)`) is appended to
    `failures` instead of raised, so this rank still reaches DeepSpeed's barriers; after
    a failure this rank writes nothing more. Each is replaced on the instance and
    restored on exit."""
    def guarded(fn, path_arg: tuple[int, str]):
        def call(*args, **kwargs):
            if failures:
                return None
            error = _attempt(lambda: fn(*args, **kwargs))
            if error:
                index, name = path_arg
                path = str(kwargs[name] if name in kwargs else args[index])
                failures.append(error if path in error else f"{path}: {error}")
            return None
        return call

    targets = [(obj, name, arg, vars(obj).get(name)) for obj, name, arg in
               ((getattr(engine, "checkpoint_engine", None), "save", (1, "path")),
                (engine, "_copy_recovery_script", (0, "save_path")))
               if obj is not None and hasattr(obj, name)]
    for obj, name, arg, _ in targets:
        setattr(obj, name, guarded(getattr(obj, name), arg))
    try:
        yield
    finally:
        for obj, name, _, own in targets:
            if own is None:
                delattr(obj, name)  # back to the class's method
            else:
                setattr(obj, name, own)


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


def step_dirs(save_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `step<N>` directory, oldest first."""
    if not Path(save_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(save_dir).iterdir()
             if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


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

    fail_if(_agree(_attempt(make_room) if rank == 0 else None))

    failures: list[str] = []
    with _recording_write_failures(engine, failures):
        engine.save_checkpoint(str(save_dir), tag=tmp_dir.name, client_state=client_state, save_latest=False)
    if not failures:
        error = _attempt(lambda: torch.save(rng_state(), tmp_dir / f"rng_rank{rank}.pt"))
        if error is None and rank == 0:
            error = _attempt(lambda: _write_meta(tmp_dir, meta))
        failures += [error] if error else []
    fail_if(_agree(failures[0] if failures else None))

    files = _gather(manifest.list_files(tmp_dir) if rank == 0 else None)[0]  # one listing for all
    entries: dict[str, dict] = {}
    error = _attempt(lambda: entries.update(manifest.entries(tmp_dir, manifest.share(files, rank, _world()),
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

    fail_if(_agree(_attempt(publish) if rank == 0 else None))
    if keep_last:
        _prune(save_dir, step, keep_last, rank)
    return final_dir


TOKENIZERS_DIR = "tokenizers"


def _write_meta(ckpt: Path, meta: dict) -> None:
    """megamm.json; the tokenizers it names are copied in beside it (`tokenizers/`), so
    the checkpoint directory alone is enough to generate and evaluate anywhere."""
    src = meta.get("tokenizers")
    if src and Path(src).is_absolute() and Path(src).is_dir():
        shutil.copytree(src, ckpt / TOKENIZERS_DIR)
        meta = {**meta, "tokenizers": TOKENIZERS_DIR, "tokenizers_source": str(src)}
    (ckpt / META_FILE).write_text(json.dumps(meta, indent=1))


def tokenizers_dir(ckpt: Path, meta: dict | None = None) -> Path | None:
    """The tokenizers of a checkpoint: its own copy (a path relative to it), or — in
    checkpoints from before they carried one — the absolute path it recorded."""
    meta = read_meta(ckpt) if meta is None else meta
    tok = meta.get("tokenizers")
    if not tok:
        return None
    return Path(tok) if Path(tok).is_absolute() else Path(ckpt) / tok


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
        problem = _one_line(e)
    return _agree(problem)


def _candidates(save_dir: Path) -> list[str]:
    """Tags to try, best first: what `latest` names, then older step<N>, newest first."""
    dirs = step_dirs(save_dir)
    latest_file = save_dir / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    if latest is None and not dirs:
        raise CheckpointError(f"no checkpoint to resume from: {latest_file} does not exist")
    m = _STEP_DIR.fullmatch(latest or "")
    if m is None:
        return [p.name for _, p in reversed(dirs)]
    return [latest] + [p.name for s, p in reversed(dirs) if s < int(m.group(1))]


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
    with refusing_unsafe_pickles(save_dir / tag):
        path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {save_dir / tag}")
        rng_file = save_dir / tag / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state or {}


# ---- loading into a plain model ------------------------------------------------------------
def has_latest(save_dir) -> bool:
    """Whether save_dir (may be None) names a `latest` checkpoint to resume from."""
    return save_dir is not None and (Path(save_dir) / LATEST).is_file()


def latest_tag(save_dir) -> str:
    save_dir = Path(save_dir)
    f = save_dir / LATEST
    if not f.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {f} does not exist")
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


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / META_FILE}: unreadable ({e})") from None


def verified_checkpoint_dir(path) -> Path:
    """checkpoint_dir(path), refused with a one-line CheckpointError unless it is intact."""
    ckpt = checkpoint_dir(path)
    problem = manifest.verify(ckpt)
    if problem:
        raise CheckpointError(f"damaged checkpoint {ckpt}: {problem}")
    return ckpt


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole plain model from a checkpoint of any layout: each
    tensor-parallel rank's state (from the ZeRO partitions, the model file, or the
    pipeline's per-layer files) under plain-model names, then the shards merged; a
    universal checkpoint (tools/reshard.py) holds them whole."""
    meta = read_meta(ckpt)
    if universal.is_universal(meta):
        with refusing_unsafe_pickles(ckpt):
            return universal.read_weights(ckpt, ModelConfig.from_dict(meta["model"]), meta)
    layout = meta.get("topology", {})
    tp, pp = int(layout.get("tp", 1)), int(layout.get("pp", 1))
    n_layers = ModelConfig.from_dict(meta["model"]).n_layers
    with refusing_unsafe_pickles(ckpt):
        shards = [_tp_rank_state(ckpt, int(meta.get("zero_stage", 0)), pp, r, n_layers) for r in range(tp)]
    return {k: v.float() for k, v in merge_shards(shards).items()}


def _tp_rank_state(ckpt: Path, zero_stage: int, pp: int, tp_rank: int, n_layers: int) -> dict:
    if pp > 1:  # ZeRO 0/1: every layer file holds its module weights
        from megamm.parallel.pipeline import plain_name

        sd = {}
        for f in sorted(ckpt.glob("layer_*-model_states.pt")):
            parts = f.name.split("-")  # layer_XX[-model_YY]-model_states.pt
            if any(p.startswith("model_") and p != f"model_{tp_rank:02d}" for p in parts[1:-1]):
                continue
            layer = int(parts[0].removeprefix("layer_"))
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                sd[plain_name(layer, n_layers, k)] = v
        if not sd:
            raise CheckpointError(f"{ckpt}: no pipeline layer files for tensor-parallel rank {tp_rank}")
        return sd
    if zero_stage > 0:  # the fp32 master weights, gathered from the ZeRO partitions of this tp rank
        return _zero_fp32(ckpt, tp_rank)
    f = ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt"
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: missing {f.name}")
    return torch.load(f, map_location="cpu", weights_only=True)["module"]


def _zero_fp32(ckpt: Path, tp_rank: int) -> dict:
    """DeepSpeed's zero_to_fp32 over the files of one tensor-parallel rank (it reads
    every file in a directory, so it is shown a directory of links to just those)."""
    import contextlib
    import io
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mine = f"mp_rank_{tp_rank:02d}"
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "view"
        view.mkdir()
        for f in ckpt.iterdir():
            if mine in f.name:
                (view / f.name.replace(mine, "mp_rank_00")).symlink_to(f.resolve())
        if not any(view.iterdir()):
            raise CheckpointError(f"{ckpt}: no files of tensor-parallel rank {tp_rank}")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag="view")


def load_model(path):
    """megamm.load_model: one plain model on CPU in eval mode with its config."""
    from megamm.model import Transformer

    ckpt = verified_checkpoint_dir(path)
    meta = read_meta(ckpt)
    config = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Transformer(config, device="meta")
    model.to_empty(device="cpu")
    sd = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.eval()
