"""DeepSpeed's compiled ops, made ready in the background while the tests that need none
of them run.

On a fresh machine (CI: an empty ~/.cache) every op DeepSpeed uses on CPU is compiled on
first use: the shared-memory collectives (every launch), fused Adam (ZeRO-0..3 without
offload), CPU Adam and pinned memory (offload), and async_io (NVMe offload; ~10
CPU-minutes, ten translation units each parsing torch's headers). tests/conftest.py runs
the tests that start no DeepSpeed run first, and at the same time starts
`python tests/ds_ops.py OP...` at nice 19, so these builds soak up the CPU the rest of the
suite leaves idle instead of stalling the first test that needs each op; that test then
loads the cached op, or waits on torch's build lock for a build still in progress. The
process is never killed: an interrupted build would leave that lock behind and hang the
next launch. An op that fails to build here is simply built (and its error shown) by the
test that needs it.
"""
import os
import subprocess
import sys

OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder", "PinMemoryBuilder")
"""Every DeepSpeed test needs the first; the order is that in which the suite meets them."""
NVME_OP = "AsyncIOBuilder"


def ensure_libaio() -> None:
    """async_io compiles against libaio: install Debian's libaio-dev when missing (CI runs
    as root on Debian, as the launch tests assume)."""
    if not os.path.exists("/usr/include/libaio.h"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "libaio-dev"], check=True, capture_output=True, env=env)


def start_background_build(ops) -> subprocess.Popen:
    """`python tests/ds_ops.py OP...` at the lowest CPU priority and one compiler at a time
    (MAX_JOBS=1: on two cores, parallel niced compilers were seen to slow the foreground's
    own op builds), in its own session (so a Ctrl-C of pytest does not interrupt the
    compiler), output discarded."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["MAX_JOBS"] = "1"
    return subprocess.Popen([sys.executable, __file__, *ops], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=lambda: os.nice(19))


def build(name: str) -> None:
    if name == NVME_OP:
        ensure_libaio()
        from deepspeed.ops.op_builder import AsyncIOBuilder

        AsyncIOBuilder().load(verbose=False)
        return
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder(name).load(verbose=False)


if __name__ == "__main__":
    failed = []
    for op in sys.argv[1:]:
        try:
            build(op)
        except Exception as e:  # noqa: BLE001  the test that needs the op builds it again and reports
            failed.append(f"{op}: {e}")
    sys.exit("\n".join(failed) if failed else 0)
