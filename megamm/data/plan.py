"""The on-disk cache of a data directory: verification stamps and packing plans, built
once by one process and then memory-mapped by every rank.

Layout of the cache folder (`<data>/.cache/`, or the `cache_dir` given when the data
directory is read-only):

    .lock                           flock()ed by the one process that writes here
    verified/<shard>-<crc>.json     stamp: shard `<shard>`, whose .idx stores CRC-32 <crc>
                                    (hex), was checked block by block in full
    plan-<hash>.json                one epoch's packing plan: its key, and the size,
                                    dtype, shape and CRC-32 of each of its two arrays:
    plan-<hash>.order.npy           int32 (int64 past 2^31 documents) [D]: the epoch's
                                    documents (global ids: shards in order) in shuffled order
    plan-<hash>.rows.npy            int64 [R + 1]: row r packs order[rows[r]:rows[r + 1]]
    blend-<hash>.json, .dataset_index.npy, .dataset_sample_index.npy
                                    a blend's index (megamm.data.blend), kept in its first
                                    source's cache folder under the same commit protocol

`<hash>` is a SHA-256 of the key: PLAN_FORMAT, each shard's name, .idx checksum and
document count, the row length, seed, shuffle and epoch. The .idx checksum (the CRC the
.idx stores, which covers its block checksums) stands for the content of both shard
files, so the key is read without touching a .bin. A plan whose json is missing or has
another key, or one of whose files has another size or checksum or a bad .npy header, is
never used: it is built again.

Writing: a process that finds nothing usable takes the lock (other processes block on
it), looks again (another may have built it while it waited), and otherwise builds,
writing each file to a temporary name, fsync()ing it and os.replace()ing it into place,
the json (the commit record, holding the arrays' checksums) last. A killed build leaves a
temporary file (removed by the next lock holder) or arrays the json does not vouch for,
never a plan that is trusted. On a file system without flock() the work may be done
twice, never trusted half-done.

Verification: a shard is read in full once, by the first process to open it (under the
lock), which writes its stamp: the key, the largest token id, and CRC-32s of the .idx in
1 MiB blocks. Later opens read the .idx's header and tail and the stamp, not the .bin nor
the .idx's offsets. Every process still checks each CRC block of a .bin, and each stamped
block of its .idx, on its first read of a document there (megamm.data.shards), so a bit
flipped after the stamp was written is named before it reaches a batch.

A cache folder that cannot be written (a read-only data directory and no cache_dir) is
used for what it already holds; what is missing is done in memory: every shard without a
stamp is checked in full at each open and plans are built in each process.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from megamm.data.shards import ShardReader

PLAN_FORMAT = 1
STAMP_FORMAT = 1


def pack_rows(lengths: np.ndarray, row_len: int) -> np.ndarray:
    """Row boundaries of next-fit packing, int64 [R + 1]: documents of `lengths` (each
    clipped to row_len) are taken in order, and a row is closed when the next document
    does not fit in what is left of it. Row r holds documents [bounds[r], bounds[r+1]).

    Vectorised: with ends = cumsum(lengths), the row that starts at document i ends before
    next[i] = the first j with ends[j] - ends[i] > row_len (one searchsorted). The rows
    are the chain 0, next[0], next[next[0]], ...; it is followed by doubling: after k
    rounds `jump` is next applied 2^k times and `chain` its first 2^k links, so the cost
    is O(D log R) array work and no Python loop per document or row."""
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), row_len)
    n = len(lengths)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    ends = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=ends[1:])
    idx = np.int32 if n < np.iinfo(np.int32).max else np.int64
    jump = np.empty(n + 1, dtype=idx)
    jump[:n] = np.searchsorted(ends, ends[:n] + row_len, side="right") - 1  # >= i + 1: lengths <= row_len
    jump[n] = n  # the end is its own successor
    del ends
    chain = np.zeros(1, dtype=idx)
    while True:
        chain = np.concatenate([chain, jump[chain]])
        if chain[-1] == n:
            break
        jump = jump[jump]
    bounds = chain[: int(np.searchsorted(chain, n)) + 1]  # strictly increasing up to the first n
    return bounds.astype(np.int64)


def build_plan(doc_lengths: np.ndarray, row_len: int, seed: int, epoch: int,
               shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(order, rows) of one epoch: the documents shuffled by Generator([seed, epoch])
    (or in order), then packed by pack_rows."""
    n = len(doc_lengths)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = order.astype(np.int32 if n < np.iinfo(np.int32).max else np.int64)
    return order, pack_rows(np.asarray(doc_lengths)[order], row_len)


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, through a read-only mapping (no anonymous memory)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return zlib.crc32(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return zlib.crc32(m)


def _write_atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DataCache:
    """One cache folder (see the module docstring); `directory` None: no folder at all."""

    def __init__(self, directory: Path | None, writable: bool):
        self.directory, self.writable = directory, writable

    @classmethod
    def for_data(cls, data_dir, cache_dir=None) -> "DataCache":
        """`cache_dir`, else `<data_dir>/.cache`, created if missing. One that cannot be
        written is used read-only, with a warning (see the module docstring)."""
        directory = Path(cache_dir) if cache_dir is not None else Path(data_dir) / ".cache"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "verified").mkdir(exist_ok=True)
            with open(directory / ".lock", "a"):
                pass
            return cls(directory, writable=True)
        except OSError as e:
            warnings.warn(f"megamm: data cache {directory} cannot be written ({e.strerror}): shards without a "
                          "verification stamp are checked in full at every open and packing plans are built "
                          "in every process; pass a writable cache_dir", stacklevel=2)
            return cls(directory if directory.is_dir() else None, writable=False)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (blocking); temporary files found then are a killed writer's."""
        if not self.writable:
            yield
            return
        with open(self.directory / ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # no flock() here: the atomic renames alone keep half-written files untrusted
                pass
            for stale in [*self.directory.glob(".*.tmp-*"), *self.directory.glob("verified/.*.tmp-*")]:
                stale.unlink(missing_ok=True)
            yield

    # verification stamps

    def _stamp_path(self, r: ShardReader) -> Path:
        return self.directory / "verified" / f"{r.prefix.name}-{r.idx_checksum:08x}.json"

    @staticmethod
    def _stamp_body(r: ShardReader, max_token: int, idx_blocks: list[int]) -> dict:
        return {"format": STAMP_FORMAT, "shard": r.prefix.name, "idx_checksum": r.idx_checksum,
                "bin_bytes": 4 * r.n_tokens, "max_token": max_token, "idx_blocks": idx_blocks}

    def _read_stamp(self, r: ShardReader) -> bool:
        """Whether r has a valid stamp; if so, r.max_token is set from it and r's .idx is
        checked by the stamp's block checksums, lazily."""
        if self.directory is None:
            return False
        try:
            got = json.loads(self._stamp_path(r).read_text())
            body = self._stamp_body(r, int(got["max_token"]), [int(c) for c in got["idx_blocks"]])
            ok = ({k: got.get(k) for k in body} == body
                  and got.get("check") == zlib.crc32(json.dumps(body, sort_keys=True).encode()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if not ok or not r.trust_index(body["idx_blocks"]):
            return False
        r.max_token = body["max_token"]
        return True

    def open_shards(self, prefixes) -> list[ShardReader]:
        """ShardReaders, lazily checked on read, of shards checked in full once: a shard
        without a valid stamp is checked now (.idx and .bin), under the lock, and stamped."""
        readers = [ShardReader(p, verify=False, check_index=False) for p in prefixes]
        todo = [r for r in readers if not self._read_stamp(r)]
        if todo:
            with self.locked():
                for r in todo:
                    if self._read_stamp(r):  # another process checked it while this one waited
                        continue
                    r.check_index()
                    r.verify()
                    if self.writable:
                        body = self._stamp_body(r, r.max_token, r.index_block_checksums())
                        body["check"] = zlib.crc32(json.dumps(body, sort_keys=True).encode())
                        _write_atomic(self._stamp_path(r), lambda f: f.write(json.dumps(body).encode()))
        return readers

    # packing plans and other cached arrays

    @staticmethod
    def _plan_name(key: dict, kind: str = "plan") -> str:
        return f"{kind}-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def _load_arrays(self, name: str, key: dict, parts: tuple[str, ...]) -> list[np.ndarray] | None:
        if self.directory is None:
            return None
        try:
            meta = json.loads((self.directory / f"{name}.json").read_text())
            if meta.get("format") != PLAN_FORMAT or meta.get("key") != key:
                return None
            arrays = []
            for part in parts:
                path, info = self.directory / f"{name}.{part}.npy", meta["files"][part]
                if path.stat().st_size != info["bytes"] or file_crc32(path) != info["crc32"]:
                    return None
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                if arr.dtype.str != info["dtype"] or list(arr.shape) != info["shape"] or arr.ndim != 1:
                    return None
                arrays.append(arr)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return arrays

    def arrays(self, kind: str, key: dict, parts: tuple[str, ...], build: Callable[[], tuple[np.ndarray, ...]],
               valid: Callable[[list[np.ndarray]], bool] = lambda arrays: True) -> list[np.ndarray]:
        """The 1-D arrays `parts` of `key` (files `<kind>-<hash>.<part>.npy`, committed by
        `<kind>-<hash>.json`), memory-mapped from the cache; `build()` makes them, in one
        process, when the cache has none that is intact and `valid`."""
        name = self._plan_name(key, kind)

        def load():
            got = self._load_arrays(name, key, parts)
            return got if got is not None and valid(got) else None

        got = load()
        if got is not None:
            return got
        if not self.writable:
            return list(build())
        with self.locked():
            got = load()  # built by another process while this one waited
            if got is not None:
                return got
            files = {}
            for part, arr in zip(parts, build()):
                path = self.directory / f"{name}.{part}.npy"
                _write_atomic(path, lambda f: np.save(f, arr, allow_pickle=False))
                files[part] = {"bytes": path.stat().st_size, "crc32": file_crc32(path),
                               "dtype": arr.dtype.str, "shape": list(arr.shape)}
                del arr
            meta = {"format": PLAN_FORMAT, "key": key, "files": files}
            _write_atomic(self.directory / f"{name}.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
            got = load()
        if got is None:
            raise OSError(f"{self.directory / name}.json: the {kind} just written does not read back")
        return got

    def plan(self, key: dict, build: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """The (order, rows) arrays of `key`, memory-mapped from the cache; `build()` makes
        them, in one process, when the cache has none that is valid."""
        def valid(arrays):
            order, rows = arrays
            return len(rows) >= 1 and rows[0] == 0 and rows[-1] == len(order)

        order, rows = self.arrays("plan", key, ("order", "rows"), build, valid)
        return order, rows
