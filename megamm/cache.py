"""The build cache: `$MEGAMM_CACHE` (default ~/.cache/megamm), entries built once,
atomically, under a file lock."""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $MEGAMM_CACHE, else ~/.cache/megamm (read at call time)."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MEGAMM_CACHE") or Path.home() / ".cache" / "megamm")


def build_once(target: Path, build: Callable[[Path], None], what: str, progress: bool = True) -> Path:
    """Make sure directory `target` exists, calling `build(tmp_dir)` to make it if not.

    The build writes into a temporary sibling that is renamed onto `target` only when
    `build` returns, so a killed build never leaves a half-made entry. A lock file
    serialises concurrent callers (e.g. several ranks): one builds, the rest wait and
    then reuse its result.
    """
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        if progress:
            print(f"megamm: building {what} (first use) in {target}", file=sys.stderr)
        start = time.perf_counter()
        try:
            build(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            print(f"megamm: built {what} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target
