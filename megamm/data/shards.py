"""Token shards on disk: `<prefix>.bin` (uint32 tokens, documents back to back) and
`<prefix>.idx` (a small header + int64 document offsets), both read through numpy memmap.

.idx layout (little endian):
    8 bytes   magic b"MEGAMMI1"
    8 bytes   int64 number of documents D
    8 bytes   int64 vocabulary size the ids were checked against
    (D+1) x int64 offsets (in tokens) into .bin; offsets[0] == 0

A writer writes to temporary files and renames them into place on close, so a
killed writer never leaves a shard that looks complete.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = b"MEGAMMI1"
_HEADER = 24


class ShardError(ValueError):
    """A shard that is missing, truncated or holds ids outside the vocabulary."""


class ShardWriter:
    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp")
        self._bin = open(self._tmp_bin, "wb")
        self._offsets = [0]

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ShardError(f"{self.prefix}: a document must be a non-empty 1-D id list")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            bad = arr.min() if arr.min() < 0 else arr.max()
            raise ShardError(f"{self.prefix}: token id {bad} outside [0, {self.vocab_size})")
        self._bin.write(arr.astype("<u4").tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        tmp_idx = Path(f"{self.prefix}.idx.tmp")
        with open(tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(np.array([len(self._offsets) - 1, self.vocab_size], dtype="<i8").tobytes())
            f.write(np.asarray(self._offsets, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_bin, f"{self.prefix}.bin")
        os.replace(tmp_idx, f"{self.prefix}.idx")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # leave nothing that looks like a shard
            self._bin.close()
            self._tmp_bin.unlink(missing_ok=True)


class ShardReader:
    """Random access to the documents of one shard. `reader[i]` -> uint32 array."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise ShardError(f"shard file missing: {p}")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER or raw[:8] != MAGIC:
            raise ShardError(f"{idx_path}: not a megamm index file (bad magic or too short)")
        n_docs, self.vocab_size = (int(x) for x in np.frombuffer(raw[8:_HEADER], dtype="<i8"))
        if len(raw) != _HEADER + 8 * (n_docs + 1):
            raise ShardError(f"{idx_path}: truncated index ({len(raw)} bytes for {n_docs} documents)")
        self.offsets = np.frombuffer(raw[_HEADER:], dtype="<i8")
        n_tokens = int(self.offsets[-1])
        size = bin_path.stat().st_size
        if size != 4 * n_tokens:
            raise ShardError(f"{bin_path}: truncated or wrong size ({size} bytes, index says {4 * n_tokens})")
        self.tokens = (np.memmap(bin_path, dtype="<u4", mode="r") if n_tokens
                       else np.zeros(0, dtype="<u4"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ShardError if any token is >= vocab_size (a shard from another vocabulary)."""
        if self.n_tokens and int(self.tokens.max()) >= vocab_size:
            bad = int(self.tokens.max())
            raise ShardError(f"{self.prefix}.bin: token id {bad} outside the model vocabulary [0, {vocab_size})")


def list_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """Shard prefixes `<dir>/<split>*.idx`, sorted."""
    directory = Path(directory)
    return sorted(p.with_suffix("") for p in directory.glob(f"{split}*.idx"))
