"""Data preparation split over many processes (an array job's tasks) and resumable:
the bookkeeping under tools/prepare_data.py's --num-shards / --shard-index / --merge.

Units. The input's records, in input order, fall into units of `shard_size` records:
unit k holds records [k * shard_size, (k + 1) * shard_size) and becomes the shards
`train-KKKKK.{bin,idx}` and `val-KKKKK.{bin,idx}` (a split the unit has no document of
gets no file). Unit k belongs to slice k mod num_shards. A unit's documents depend only
on its records and the options (every record's document RNG and train/val draw are
seeded by its key), so the shards' bytes do not depend on how many slices, workers or
restarts made them.

The work area, OUT/.prep/, holds a run until it is merged:

    options.json             what every slice must agree on (input stamp, options)
    train-KKKKK.{bin,idx}    finished units' shards (ShardWriter: atomic per file)
    unit-KKKKK.json          unit k's done-marker, written last: its counts and reports
    slice-I-of-N.json        slice I's done-marker: how many records the input holds
    tokenizers/              the composed tokenizers, when pretrained ones were given
    lock                     flock'd while options are claimed and while merging

A killed slice, run again with the same arguments, keeps every unit with a done-marker
and redoes the one it was writing. `merge` runs once every unit is done (the slice that
finishes last does it, or `prepare_data.py --merge OUT`): it hard-links the shards into
OUT, removes OUT's shards of an earlier run, writes meta.json and removes the work area.
Until then OUT's own files are untouched; a merge killed half-way is redone from the
work area, which it removes only at the end.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from megamm.data.documents import DocumentCounts, write_meta
from megamm.data.shards import ShardWriter
from megamm.vocab import Vocab

WORK = ".prep"
MAX_UNITS = 100_000
"""Units are named with 5 digits (sorted by name, as the loader lists them)."""
SPLITS = ("train", "val")


class SliceError(ValueError):
    """A slicing, resume or merge problem, in one line."""


def slice_of(num_shards: int | None, shard_index: int | None, env=None) -> tuple[int, int]:
    """(num_shards, shard_index): the flags, else a SLURM array job's
    SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_ID (counted from SLURM_ARRAY_TASK_MIN),
    else (1, 0). Raises SliceError for an index that is not below the count."""
    env = os.environ if env is None else env
    if num_shards is None and "SLURM_ARRAY_TASK_COUNT" in env:
        num_shards = int(env["SLURM_ARRAY_TASK_COUNT"])
    if shard_index is None and "SLURM_ARRAY_TASK_ID" in env:
        shard_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    num_shards = 1 if num_shards is None else num_shards
    shard_index = 0 if shard_index is None else shard_index
    if num_shards < 1:
        raise SliceError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise SliceError(f"--shard-index {shard_index} is not below --num-shards {num_shards} "
                         f"(slices are numbered 0 to {num_shards - 1})")
    return num_shards, shard_index


def input_stamp(paths) -> list:
    """[name, size, mtime_ns] of each input file: a resumed slice refuses a changed input."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


class WorkArea:
    """OUT/.prep/ (see the module doc)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out / WORK

    @contextmanager
    def locked(self, create: bool = True):
        """Hold the work area's lock; yields False, holding nothing, when `create` is off
        and there is no work area (another slice merged it and removed it)."""
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
        try:
            f = open(self.dir / "lock", "a" if create else "r")
        except FileNotFoundError:
            yield False
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- options -------------------------------------------------------------------------
    def claim(self, options: dict) -> None:
        """Record `options` for this run, or check them against those recorded by the
        slices (or the killed run) before: another value is a SliceError naming it."""
        options = json.loads(json.dumps(options))  # as it reads back
        with self.locked():
            path = self.dir / "options.json"
            if path.exists():
                before = json.loads(path.read_text())
                for key in sorted(set(before) | set(options)):
                    if before.get(key) != options.get(key):
                        raise SliceError(
                            f"{self.dir} holds an unfinished run with other {key!r} "
                            f"({_short(before.get(key))}, here {_short(options.get(key))}): run it again as it "
                            f"was started, or remove {self.dir} to start over")
                return
            _write_json(path, options)

    def options(self) -> dict | None:
        path = self.dir / "options.json"
        return json.loads(path.read_text()) if path.exists() else None

    # ---- units ---------------------------------------------------------------------------
    def unit_marker(self, k: int) -> Path:
        return self.dir / f"unit-{k:05d}.json"

    def done_unit(self, k: int) -> dict | None:
        """Unit k's marker when it and every file it names are there, else None."""
        try:
            stats = json.loads(self.unit_marker(k).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        for name, size in stats["files"].items():
            path = self.dir / name
            if not path.is_file() or path.stat().st_size != size:
                return None
        return stats

    def unit_writer(self, k: int, vocab: Vocab) -> UnitWriter:
        if k >= MAX_UNITS:
            raise SliceError(f"the input needs more than {MAX_UNITS} shards: raise --shard-size")
        return UnitWriter(self, k, vocab)

    # ---- slices --------------------------------------------------------------------------
    def finish_slice(self, index: int, num: int, records: int) -> None:
        _write_json(self.dir / f"slice-{index}-of-{num}.json", {"records": records})

    def status(self) -> tuple[int | None, dict[int, int]]:
        """(records in the input, as the finished slices saw it, or None before any has
        finished; {slice count N: finished slices} of the markers present). Raises
        SliceError when finished slices disagree about the input."""
        seen, finished = {}, {}
        for path in sorted(self.dir.glob("slice-*-of-*.json")):
            index, num = (int(x) for x in path.stem[len("slice-"):].split("-of-"))
            seen[path.name] = json.loads(path.read_text())["records"]
            finished.setdefault(num, set()).add(index)
        if len(set(seen.values())) > 1:
            raise SliceError(f"{self.dir}: the slices saw inputs of different lengths "
                             f"({', '.join(f'{k}: {v} records' for k, v in sorted(seen.items()))})")
        return (next(iter(seen.values())) if seen else None), finished

    def _survey(self, shard_size: int, num: int | None) -> tuple[int | None, list[dict | None], str]:
        """(records in the input or None before any slice finished, each unit's done-marker
        or None, a line naming the slices that owe the missing ones: `num` slices, default
        the largest slice count among the finished markers); each marker read once."""
        records, finished = self.status()
        if records is None:
            return None, [], "no slice has finished yet"
        markers = [self.done_unit(k) for k in range(-(-records // shard_size))]
        num = num or max(finished)
        lacking = sorted({k % num for k, m in enumerate(markers) if m is None})
        return records, markers, f"slice(s) {', '.join(map(str, lacking))} of {num} not finished"

    def missing(self, shard_size: int, num: int | None = None) -> tuple[int | None, list[int], str]:
        """(records in the input or None, units not done, the line naming who owes them)."""
        records, markers, owed = self._survey(shard_size, num)
        return records, [k for k, m in enumerate(markers) if m is None], owed

    def units(self, num: int | None = None) -> list[dict]:
        """Every unit's done-marker, in order; a SliceError naming the slices (of `num`, as
        in `missing`) and units not done while any is not."""
        records, markers, owed = self._survey(self.options()["shard_size"], num)
        todo = [k for k, m in enumerate(markers) if m is None]
        if records is None or todo:
            units = ", ".join(map(str, todo[:10])) + (" ..." if len(todo) > 10 else "")
            raise SliceError(f"{self.out}: cannot merge yet: {owed}" + (f" (units {units} not done)" if todo else ""))
        return markers

    # ---- merge ---------------------------------------------------------------------------
    def merge(self, vocab: Vocab, tokenizers_dir: Path | str, extra: dict, stats: list[dict]) -> dict:
        """Every unit's done-marker (`units()`) -> OUT's shards and meta.json (returned);
        the work area is removed. `tokenizers_dir` is linked to OUT/tokenizers when it lies
        inside the work area."""
        files = [name for s in stats for name in s["files"]]
        for split in SPLITS:  # an empty split still gets a (valid, empty) shard
            if not any(name.startswith(f"{split}-") for name in files):
                ShardWriter(self.dir / f"{split}-00000", vocab.size).close()
                files.append(f"{split}-00000.bin")
                files.append(f"{split}-00000.idx")
        tok = Path(tokenizers_dir)
        if self.dir in tok.resolve().parents:
            final = self.out / "tokenizers"
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(tok, final, copy_function=_link)  # a merge killed here is simply redone
            tok = final
        keep = set(files)
        for old in [*self.out.glob("train-*"), *self.out.glob("val-*")]:
            if old.suffix in (".bin", ".idx") and old.name not in keep:
                old.unlink()
        for name in sorted(files):
            tmp = self.out / f".{name}.merge"
            tmp.unlink(missing_ok=True)
            _link(self.dir / name, tmp)
            os.replace(tmp, self.out / name)
        counts = DocumentCounts(vocab)
        for unit in stats:
            counts.add_counts(unit)
        meta = write_meta(self.out, vocab, tok, counts.to_dict(), extra)
        shutil.rmtree(self.dir)
        return meta


class UnitWriter:
    """Unit k's train and val shards in the work area, with its counts; `close(report)`
    writes its done-marker. Leftovers of a killed attempt at the unit are removed first."""

    def __init__(self, area: WorkArea, k: int, vocab: Vocab):
        self.area, self.k, self.vocab = area, k, vocab
        area.unit_marker(k).unlink(missing_ok=True)
        for split in SPLITS:
            for suffix in (".bin", ".idx", ".bin.tmp", ".idx.tmp"):
                (area.dir / f"{split}-{k:05d}{suffix}").unlink(missing_ok=True)
        self.writers = {split: ShardWriter(area.dir / f"{split}-{k:05d}", vocab.size) for split in SPLITS}
        self.counts = DocumentCounts(vocab)

    def add(self, split: str, ids, template: str | None = None) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        self.writers[split].add_document(arr)
        self.counts.add(split, arr, template)

    def close(self, report: dict) -> dict:
        """Finish the shards (a split without documents gets none) and write the marker:
        the counts, the file sizes and `report` (JSON-able: what the unit skipped, ...)."""
        files = {}
        for split, w in self.writers.items():
            if self.counts.documents[split]:
                w.close()
                for suffix in (".bin", ".idx"):
                    name = f"{split}-{self.k:05d}{suffix}"
                    files[name] = (self.area.dir / name).stat().st_size
            else:
                w.__exit__(RuntimeError, None, None)  # drop the empty file
        stats = {"unit": self.k, "files": files, **self.counts.to_dict(), **report}
        _write_json(self.area.unit_marker(self.k), stats)
        return stats

    def abort(self) -> None:
        for w in self.writers.values():
            w.__exit__(RuntimeError, None, None)


def _link(src, dst) -> None:
    """Hard-link (no second copy of a tokenizer's weights), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
