"""The manifest of a checkpoint: every file's size and CRC-32, so damage is found
before a single byte of it is loaded.

`<checkpoint>/manifest.json`:

    {"format": 1, "checksum": "crc32",
     "files": {"<path relative to the checkpoint>": {"size": <bytes>, "crc32": "<8 hex digits>"}, ...}}

It lists every file of the checkpoint directory except itself. A checkpoint is intact
when the manifest parses, every listed file exists with its size and checksum, and no
other file is present. Checksums are computed by reading the files back from disk
after they were written and fsynced, so the manifest describes what is on disk.

The work splits over ranks: `share(files, rank, world)` is the slice one rank reads;
checkpoint.py gathers the slices. CRC-32 (zlib, which releases the GIL) is the fast
checksum the Python standard library has; it detects truncation, bit flips and torn
writes, not deliberate tampering (safe_load.py covers what a tampered file can do).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

FILE = "manifest.json"
FORMAT = 1
CHUNK = 1 << 23


def list_files(ckpt: Path) -> list[str]:
    """Relative paths of every file of the checkpoint except the manifest, sorted."""
    ckpt = Path(ckpt)
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != FILE)


def share(files: list[str], rank: int, world: int) -> list[str]:
    """The files one rank reads: every world-th, starting at its rank."""
    return files[rank::world]


def file_entry(path: Path, fsync: bool = False) -> dict:
    """{"size", "crc32"} of one file, read back from disk (fsynced first if asked)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def entries(ckpt: Path, files: list[str], fsync: bool = False) -> dict[str, dict]:
    return {rel: file_entry(Path(ckpt) / rel, fsync) for rel in files}


def write(ckpt: Path, files: dict[str, dict]) -> None:
    """Write manifest.json durably (temporary file, fsync, rename)."""
    body = json.dumps({"format": FORMAT, "checksum": "crc32", "files": dict(sorted(files.items()))}, indent=1)
    tmp = Path(ckpt) / f".{FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(ckpt) / FILE)


def read(ckpt: Path) -> dict[str, dict]:
    """The recorded files; raises ValueError with a short reason if unusable."""
    path = Path(ckpt) / FILE
    if not path.is_file():
        raise ValueError(f"no {FILE}")
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
        return {str(k): {"size": int(v["size"]), "crc32": str(v["crc32"])} for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"{FILE} is unreadable") from None


def check_listing(ckpt: Path, recorded: dict[str, dict]) -> str | None:
    """Missing, wrong-sized or unlisted files (no contents read); None if none."""
    present = set(list_files(ckpt))
    missing = sorted(set(recorded) - present)
    if missing:
        return f"{missing[0]} is missing"
    extra = sorted(present - set(recorded))
    if extra:
        return f"{extra[0]} is not in {FILE}"
    for rel, want in recorded.items():
        size = (Path(ckpt) / rel).stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {FILE} says {want['size']}"
    return None


def check_contents(ckpt: Path, recorded: dict[str, dict], files: list[str]) -> str | None:
    """Checksum mismatches among `files` (read in full); None if none."""
    for rel in files:
        got = file_entry(Path(ckpt) / rel)
        if got != recorded[rel]:
            return f"{rel} fails its checksum"
    return None


def verify(ckpt: Path) -> str | None:
    """The first problem of a checkpoint directory, or None if it is intact (one process)."""
    try:
        recorded = read(ckpt)
    except ValueError as e:
        return str(e)
    return check_listing(ckpt, recorded) or check_contents(ckpt, recorded, sorted(recorded))
