"""One copy of the tokenizers per save directory, however many checkpoints name them.

A checkpoint stays self-contained: `step<N>/tokenizers/` holds every file of the
tokenizer folder, and the manifest lists and checksums them like any other file. But the
files are hard links into `<save_dir>/.blobs/<sha256>`, a content-addressed store, so a
1 GB pretrained tokenizer takes 1 GB per save directory, not 1 GB per step. Blobs are
read-only (0444): a checkpoint's files are never edited in place, and a hard link
shares its bytes with every step that names it. Copying a checkpoint elsewhere (cp -r,
rsync without -H) copies the bytes; nothing points back into the store.

Where the file system refuses hard links, the file is copied instead (the checkpoint is
the same, only bigger). `prune(save_dir)` deletes the blobs no checkpoint links any more
(link count 1), after a checkpoint was deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

STORE = ".blobs"
INDEX = "index.json"
"""{"<abs path>": [size, mtime_ns, sha256]}: the digest of a source file seen before, so a
1 GB tokenizer is hashed once per save directory, not at every save."""
CHUNK = 1 << 23


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _read_index(store: Path) -> dict:
    try:
        return json.loads((store / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_index(store: Path, index: dict) -> None:
    tmp = store / f".{INDEX}.{os.getpid()}"
    tmp.write_text(json.dumps(index, sort_keys=True))
    os.replace(tmp, store / INDEX)


def link_tree(src: Path, dst: Path, save_dir: Path) -> int:
    """Recreate folder `src` at `dst` (which must not exist) from hard links into
    `<save_dir>/.blobs`, adding the blobs it lacks. Returns the bytes newly stored."""
    src, dst, store = Path(src), Path(dst), Path(save_dir) / STORE
    store.mkdir(parents=True, exist_ok=True)
    index = _read_index(store)
    added = 0
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        st = f.stat()
        key = str(f.resolve())
        known = index.get(key)
        digest = known[2] if known and known[:2] == [st.st_size, st.st_mtime_ns] else _sha256(f)
        blob = store / digest
        if not blob.is_file() or blob.stat().st_size != st.st_size:
            tmp = store / f".{digest}.{os.getpid()}"
            shutil.copyfile(f, tmp)
            if _sha256(tmp) != digest:  # the source changed while it was read
                tmp.unlink()
                raise OSError(f"{f} changed while it was copied into the checkpoint; save again")
            os.chmod(tmp, 0o444)
            os.replace(tmp, blob)
            added += st.st_size
        index[key] = [st.st_size, st.st_mtime_ns, digest]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blob, target)
        except OSError:
            shutil.copyfile(blob, target)
    _write_index(store, index)
    return added


def prune(save_dir: Path) -> list[str]:
    """Delete the blobs no file of the save directory links to any more; their names."""
    store = Path(save_dir) / STORE
    if not store.is_dir():
        return []
    gone = []
    for blob in store.iterdir():
        if blob.is_file() and not blob.name.startswith(".") and blob.name != INDEX and blob.stat().st_nlink == 1:
            blob.unlink()
            gone.append(blob.name)
    if gone:
        index = {k: v for k, v in _read_index(store).items() if v[2] not in set(gone)}
        _write_index(store, index)
    return gone
