"""DeepSpeed's NVMe op (async_io), made ready for the test that trains under
ds_configs/zero3_offload_nvme.json.

Compiling async_io takes ~10 CPU-minutes (ten translation units, each parsing torch's
headers). tests/conftest.py starts `python tests/ds_ops.py` at nice 19 as soon as that test
is selected, so the build soaks up the CPU the rest of the suite leaves idle (about a
third of two cores) instead of stalling the test itself; the test's own launch then loads
the cached op, or waits on torch's build lock for a build still in progress. The process is
never killed: an interrupted build would leave that lock behind and hang the next launch.
"""
import os
import subprocess
import sys


def ensure_libaio() -> None:
    """async_io compiles against libaio: install Debian's libaio-dev when missing (CI runs
    as root on Debian, as the launch tests assume)."""
    if not os.path.exists("/usr/include/libaio.h"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "libaio-dev"], check=True, capture_output=True, env=env)


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
    ensure_libaio()
    from deepspeed.ops.op_builder import AsyncIOBuilder

    AsyncIOBuilder().load(verbose=False)
