"""Token shards on disk: `<prefix>.bin` (uint32 tokens, documents back to back) and
`<prefix>.idx` (a small header, int64 document offsets and checksums), both read
through numpy memmap.

.idx layout, format 2 (little endian):
    8 bytes   magic b"MEGAMMI2"
    8 bytes   int64 number of documents D
    8 bytes   int64 vocabulary size the ids were checked against
    8 bytes   int64 checksum block size B (bytes of .bin per checksum)
    (D+1) x int64 offsets (in tokens) into .bin; offsets[0] == 0
    K x uint32 CRC-32 of .bin bytes [k*B, min((k+1)*B, size)), K = ceil(4 * offsets[D] / B)
    4 bytes   uint32 CRC-32 of every .idx byte before it

A reader checks the sizes and the .idx against its own trailing checksum when it opens
them (both files are memory-mapped: opening costs no anonymous memory); given block
checksums of the .idx from a verification stamp (megamm.data.plan), it checks the .idx
block by block instead. The .bin is checked block by block against the recorded
checksums: all at once with `verify=True` (or `verify()`), else lazily, each block on the
first read of a document in it, with a bitmap of the blocks this reader has checked. A mismatch is a ShardError naming the file
and the byte range, raised before the document is returned. Format 1 (magic b"MEGAMMI1", no
checksums) is refused with a one-line error that says to
prepare the data again; the embedded default dataset's cache key includes
FORMAT_VERSION, so its cached copy is rebuilt in the new format on first use.

A writer writes to temporary files and renames them into place on close, so a
killed writer never leaves a shard that looks complete.
"""
from __future__ import annotations

import os
import zlib
from array import array
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
MAGIC = b"MEGAMMI2"
OLD_MAGICS = {b"MEGAMMI1": 1}
BLOCK_BYTES = 1 << 24
"""Bytes of .bin covered by one checksum: a mismatch names a 16 MiB range."""
INDEX_BLOCK_BYTES = 1 << 20
"""Bytes of .idx per checksum in a verification stamp (megamm.data.plan), for lazy checks."""
_HEADER = 32


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupt or holds ids outside the vocabulary."""


def block_checksums(data: np.ndarray | bytes, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """uint32 [ceil(nbytes / block_bytes)]: CRC-32 of each block of a byte buffer."""
    buf = memoryview(data).cast("B")
    return np.array([zlib.crc32(buf[s: s + block_bytes]) for s in range(0, len(buf), block_bytes)],
                    dtype="<u4")


class ShardWriter:
    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp")
        self._bin = open(self._tmp_bin, "wb")
        self._offsets = array("q", [0])  # 8 bytes a document, not a Python int each
        self._crcs: list[int] = []
        self._block_crc, self._block_fill = 0, 0

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ShardError(f"{self.prefix}: a document must be a non-empty 1-D id list")
        self._check_ids(arr)
        self._write(arr.astype("<u4"))
        self._offsets.append(self._offsets[-1] + arr.size)

    def add_documents(self, ids, lengths) -> None:
        """Many documents at once: `ids` their tokens back to back, `lengths` theirs."""
        arr, lengths = np.asarray(ids), np.asarray(lengths, dtype=np.int64)
        if arr.ndim != 1 or lengths.ndim != 1 or (lengths < 1).any() or lengths.sum() != arr.size:
            raise ShardError(f"{self.prefix}: documents must be non-empty and their lengths must sum to "
                             f"the {arr.size} ids given")
        self._check_ids(arr)
        self._write(np.ascontiguousarray(arr, dtype="<u4"))
        self._offsets.frombytes((self._offsets[-1] + np.cumsum(lengths)).astype(np.int64).tobytes())

    def _check_ids(self, arr: np.ndarray) -> None:
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr.min() if arr.min() < 0 else arr.max()
            raise ShardError(f"{self.prefix}: token id {bad} outside [0, {self.vocab_size})")

    def _write(self, data: np.ndarray) -> None:
        raw = memoryview(data).cast("B")
        self._bin.write(raw)
        while len(raw):  # running CRC-32 per BLOCK_BYTES block, as the bytes go out
            take = min(len(raw), BLOCK_BYTES - self._block_fill)
            self._block_crc = zlib.crc32(raw[:take], self._block_crc)
            self._block_fill += take
            raw = raw[take:]
            if self._block_fill == BLOCK_BYTES:
                self._crcs.append(self._block_crc)
                self._block_crc, self._block_fill = 0, 0

    def close(self) -> None:
        if self._block_fill:
            self._crcs.append(self._block_crc)
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        tmp_idx = Path(f"{self.prefix}.idx.tmp")
        body = (MAGIC + np.array([len(self._offsets) - 1, self.vocab_size, BLOCK_BYTES], dtype="<i8").tobytes()
                + np.frombuffer(self._offsets, dtype=np.int64).astype("<i8").tobytes()
                + np.asarray(self._crcs, dtype="<u4").tobytes())
        with open(tmp_idx, "wb") as f:
            f.write(body + np.array([zlib.crc32(body)], dtype="<u4").tobytes())
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


class _LazyBlocks:
    """CRC-32 blocks of one file's bytes, each checked on the first read that touches it."""

    def __init__(self, path: Path, buf, crcs: np.ndarray, block: int):
        self.path, self.buf, self.crcs, self.block = path, memoryview(buf).cast("B"), crcs, block
        self.done = np.zeros(len(crcs), dtype=bool)
        self.n_done = 0

    def check(self, lo: int, hi: int) -> None:
        """Check the blocks holding bytes [lo, hi) that have not been checked yet."""
        if self.n_done == len(self.done) or hi <= lo:
            return
        for k in range(lo // self.block, (hi - 1) // self.block + 1):
            if self.done[k]:
                continue
            b0, b1 = k * self.block, min((k + 1) * self.block, len(self.buf))
            if zlib.crc32(self.buf[b0:b1]) != int(self.crcs[k]):
                raise ShardError(f"{self.path}: checksum mismatch in bytes [{b0}, {b1}) (block {k} of "
                                 f"{len(self.crcs)}, found on read); the shard is corrupt, prepare it again")
            self.done[k] = True
            self.n_done += 1

    def mark_all(self) -> None:
        self.done[:] = True
        self.n_done = len(self.done)


class ShardReader:
    """Random access to the documents of one shard. `reader[i]` -> uint32 array.

    Opening checks the sizes and the .idx against its trailing checksum. `verify=True` also
    checks every block of the .bin now (one full read) and records the largest token id;
    `verify=False` leaves each block to be checked on the first read of a document in it
    (megamm.data.plan's verification stamp says a full check was done once).
    `check_index=False` defers the .idx check to the caller, who must call check_index()
    or trust_index() (the latter with block checksums of the .idx that a stamp recorded;
    the .idx is then checked block by block as it is read, like the .bin)."""

    def __init__(self, prefix: str | os.PathLike, verify: bool = True, check_index: bool = True):
        self.prefix = Path(prefix)
        self.idx_path, self.bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise ShardError(f"shard file missing: {p}")
        raw = np.memmap(self.idx_path, dtype="u1", mode="r") if self.idx_path.stat().st_size else b""
        if bytes(raw[:8]) in OLD_MAGICS:
            raise ShardError(f"{self.idx_path}: shard format {OLD_MAGICS[bytes(raw[:8])]} has no checksums; "
                             f"prepare the data again (tools/prepare_data.py writes format {FORMAT_VERSION})")
        if len(raw) < _HEADER + 12 or bytes(raw[:8]) != MAGIC:
            raise ShardError(f"{self.idx_path}: not a megamm index file (bad magic or too short)")
        self._idx_raw = raw
        self.idx_checksum = int(np.frombuffer(raw[-4:], dtype="<u4")[0])
        """The .idx's stored trailing CRC-32: it covers the block checksums, so it keys the
        content of both files (verification stamps and plan caches use it)."""
        self._idx_blocks: _LazyBlocks | None = None  # set by trust_index
        if check_index:
            self.check_index()
        n_docs, self.vocab_size, block = (int(x) for x in np.frombuffer(raw[8:_HEADER], dtype="<i8"))
        self._end_offsets = end_offsets = _HEADER + 8 * (n_docs + 1)
        if n_docs < 0 or block < 1 or end_offsets > len(raw) - 4:
            raise ShardError(f"{self.idx_path}: malformed header ({n_docs} documents, block size {block})")
        self.offsets = np.frombuffer(raw, dtype="<i8", count=n_docs + 1, offset=_HEADER)
        n_tokens = int(self.offsets[-1])
        self.checksums = np.frombuffer(raw, dtype="<u4", count=(len(raw) - 4 - end_offsets) // 4,
                                       offset=end_offsets)
        if len(self.checksums) != -(-4 * n_tokens // block) or (len(raw) - 4 - end_offsets) % 4:
            raise ShardError(f"{self.idx_path}: {len(self.checksums)} checksums for {4 * n_tokens} bytes of tokens")
        size = self.bin_path.stat().st_size
        if size != 4 * n_tokens:
            raise ShardError(f"{self.bin_path}: truncated or wrong size ({size} bytes, index says {4 * n_tokens})")
        self.tokens = (np.memmap(self.bin_path, dtype="<u4", mode="r") if n_tokens
                       else np.zeros(0, dtype="<u4"))
        self.block_bytes = block
        self._bin_blocks = _LazyBlocks(self.bin_path, self.tokens, self.checksums, block)
        self.max_token: int | None = None
        """Largest token id, known after a full check (or given by a verification stamp)."""
        if verify:
            self.verify()

    def check_index(self) -> None:
        """Check the whole .idx against its trailing checksum (one read of it)."""
        if zlib.crc32(self._idx_raw[:-4]) != self.idx_checksum:
            raise ShardError(f"{self.idx_path}: checksum mismatch (the index is corrupt or truncated)")

    def index_block_checksums(self) -> list[int]:
        """CRC-32 of each INDEX_BLOCK_BYTES of the .idx (for a stamp; after check_index)."""
        return block_checksums(self._idx_raw, INDEX_BLOCK_BYTES).tolist()

    def trust_index(self, crcs: list[int]) -> bool:
        """Check the .idx lazily against `crcs` (index_block_checksums of a full check): its
        header and tail (the .bin checksums) now, each block of offsets on first read. False,
        checking nothing, when `crcs` cannot be this file's (another size)."""
        if len(crcs) != -(-len(self._idx_raw) // INDEX_BLOCK_BYTES):
            return False
        self._idx_blocks = _LazyBlocks(self.idx_path, self._idx_raw, np.asarray(crcs, dtype=np.uint32),
                                       INDEX_BLOCK_BYTES)
        self._idx_blocks.check(0, _HEADER)
        self._idx_blocks.check(self._end_offsets - 8, len(self._idx_raw))
        return True

    def verify(self) -> None:
        """Check every block not yet checked (one read of the .bin) and record max_token."""
        block, nbytes, blocks = self.block_bytes, 4 * self.n_tokens, self._bin_blocks
        bad, top = [], -1
        for k in range(len(self.checksums)):
            lo, hi = k * block, min((k + 1) * block, nbytes)
            if not blocks.done[k] and zlib.crc32(blocks.buf[lo:hi]) != int(self.checksums[k]):
                bad.append(k)
            elif not bad:  # the largest id, from the same pass while the bytes are hot
                top = max(top, int(self.tokens[lo // 4: -(-hi // 4)].max()))
        if bad:
            k = bad[0]
            raise ShardError(f"{self.bin_path}: checksum mismatch in bytes [{k * block}, "
                             f"{min((k + 1) * block, nbytes)}) ({len(bad)} bad block(s)); "
                             "the shard is corrupt, prepare it again")
        blocks.mark_all()
        self.max_token = top

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = range(len(self))[i]
        if self._idx_blocks is not None:
            self._idx_blocks.check(_HEADER + 8 * i, _HEADER + 8 * (i + 2))
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        self._bin_blocks.check(4 * lo, 4 * hi)
        return self.tokens[lo:hi]

    def doc_lengths(self) -> np.ndarray:
        if self._idx_blocks is not None:
            self._idx_blocks.check(_HEADER, self._end_offsets)
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ShardError if any token is >= vocab_size (a shard from another vocabulary).
        Uses max_token when known, else reads the .bin."""
        top = self.max_token
        if top is None:
            top = int(self.tokens.max()) if self.n_tokens else -1
        if top >= vocab_size:
            raise ShardError(f"{self.prefix}.bin: token id {top} outside the model vocabulary [0, {vocab_size})")


def list_shards(directory: str | os.PathLike, split: str = "") -> list[Path]:
    """Shard prefixes `<dir>/<split>*.idx`, sorted (every shard when split is empty)."""
    directory = Path(directory)
    return sorted(p.with_suffix("") for p in directory.glob(f"{split}*.idx"))


def verify_directory(directory: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """(prefix, None if intact else the one-line problem) for every shard in a directory."""
    out = []
    for prefix in list_shards(directory):
        try:
            ShardReader(prefix)
            out.append((prefix, None))
        except ShardError as e:
            out.append((prefix, str(e)))
    return out
