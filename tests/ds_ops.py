"""DeepSpeed's NVMe ops (async_io and the pin_memory op it links against), made ready for
the tests that train under ds_configs/zero3_offload_nvme.json.

DeepSpeed JIT-builds async_io from twelve C++ files, nine of which parse all of torch's
headers: about 10 CPU-minutes here, a sixth of the whole suite's CPU time. The tests build
the same sources as one translation unit instead (the torch-including files concatenated;
DeepSpeed's headers given `#pragma once`, the three files of csrc/aio/common, which define
the same constants, compiled on their own), which takes about 40 s, and register the
modules in DeepSpeed's own op cache (`OpBuilder._loaded_ops`), so
`AsyncIOBuilder().load()` inside the training processes returns them. What the swapper
runs is DeepSpeed's code, compiled with DeepSpeed's flags; only the file layout of the
build differs. A user's NVMe run builds the op the usual way.

tests/conftest.py starts `python tests/ds_ops.py` at nice 19 as soon as an NVMe test is
selected; the probe that trains the NVMe runs (tests/checkpoint/many_runs.py) calls
`register()`, which loads the cached build or waits on torch's build lock for one in
progress. The background process is never killed: an interrupted build would leave that
lock behind and hang the next launch.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

# the ops, their builders' names, and the source folders each one needs
OPS = {"pin_memory": ("PinMemoryBuilder", ("pin_memory",)),
       "async_io": ("AsyncIOBuilder", ("aio", "pin_memory"))}


def ensure_libaio() -> None:
    """async_io compiles against libaio: install Debian's libaio-dev when missing (CI runs
    as root on Debian, as the launch tests assume)."""
    if not os.path.exists("/usr/include/libaio.h"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "libaio-dev"], check=True, capture_output=True, env=env)


def _builder(name: str):
    import deepspeed.ops.op_builder as ob

    return getattr(ob, OPS[name][0])()


def _unity_sources(name: str, root: Path) -> tuple[list[str], list[str]]:
    """DeepSpeed's sources of op `name`, copied under `root`: (sources to compile,
    include paths). The files that include torch become one translation unit."""
    builder = _builder(name)
    csrc = Path(builder.deepspeed_src_path("csrc"))
    for sub in OPS[name][1]:
        if not (root / sub).exists():  # copied aside, then renamed: a racing process sees all or nothing
            part = root / f".{sub}.{os.getpid()}"
            shutil.copytree(csrc / sub, part)
            for header in part.rglob("*.h"):
                text = header.read_text()
                if "#pragma once" not in text:
                    header.write_text("#pragma once\n" + text)
            try:
                part.rename(root / sub)
            except OSError:  # another process got there first
                shutil.rmtree(part)
    files = [root / Path(s).relative_to("csrc") for s in builder.sources()]
    standalone = [f for f in files if "common" in f.parts or f.name == "page_alloc.cpp"]
    unity, text = root / f"{name}_unity.cpp", "".join(f'#include "{f}"\n' for f in files if f not in standalone)
    if not unity.exists() or unity.read_text() != text:
        part = root / f".{unity.name}.{os.getpid()}"
        part.write_text(text)
        part.replace(unity)
    includes = [str(root / Path(p).relative_to("csrc")) for p in builder.include_paths()]
    return [str(unity), *map(str, standalone)], includes


def build(name: str):
    """Op `name` built from one translation unit (cached under torch's extensions folder,
    as DeepSpeed's own builds are) and imported."""
    from torch.utils.cpp_extension import _get_build_directory, load

    builder = _builder(name)
    module = f"megamm_test_{name}"
    build_dir = Path(_get_build_directory(module, verbose=False))
    sources, includes = _unity_sources(name, build_dir / "src")
    flags = [f for f in builder.strip_empty_entries(builder.cxx_args()) if f != "-g"]
    return load(name=module, sources=sources, extra_include_paths=includes, extra_cflags=flags,
                extra_ldflags=builder.strip_empty_entries(builder.extra_ldflags()), verbose=False)


def register() -> None:
    """Build (or load) both ops and put them in DeepSpeed's op cache, pin_memory first and
    global (async_io resolves its pinned-tensor manager from it)."""
    from deepspeed.ops.op_builder.builder import OpBuilder
    from deepspeed.ops.op_builder.pin_memory_load import load_pin_memory_module

    ensure_libaio()
    pin = OpBuilder._loaded_ops["pin_memory"] = build("pin_memory")
    # DeepSpeed's own loader: caches it process-wide and opens it RTLD_GLOBAL for async_io
    assert load_pin_memory_module(_builder("pin_memory")) is pin
    OpBuilder._loaded_ops["async_io"] = build("async_io")


def start_background_build() -> subprocess.Popen:
    """`python tests/ds_ops.py` at the lowest CPU priority and one compiler at a time
    (MAX_JOBS=1: on two cores, parallel niced compilers were seen to slow the foreground's
    own op builds), in its own session (so a Ctrl-C of pytest does not interrupt the
    compiler), output discarded."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["MAX_JOBS"] = "1"
    return subprocess.Popen([sys.executable, __file__], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=lambda: os.nice(19))


if __name__ == "__main__":
    register()
