import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, ranks=None, timeout=600) -> subprocess.CompletedProcess:
    """launch/train.py with args: under `deepspeed --num_gpus ranks`, or plain python.
    The result's `master_port` is the launch's port (None without a launcher)."""
    port = None
    if ranks is None:
        cmd = [sys.executable, "launch/train.py"]
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(port), "launch/train.py"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd + [str(a) for a in args] + ["--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    proc.master_port = port
    return proc


def losses(save_dir) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed run appends)."""
    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r
    return out


def run_many(runs: dict[str, tuple[list, int]], plan_dir: Path, timeout=1500, side_by_side: bool = False) -> None:
    """Several launch/train.py argument lists, {name: (args, ranks)}, in one launch per world
    size (tests/checkpoint/many_runs.py: each run goes through the trainer's own run(), one
    after another in the same processes), in the dict's order within a world size of two
    or more. Asserts every launch succeeded. Shares DeepSpeed's start-up between the runs
    of a fixture.

    `side_by_side`: one-rank runs leave a core of the 2-core machine idle, so they run
    beside the two-rank launch, or in two launches side by side when there is none. Only
    for light runs (not NVMe offload, whose buffers twice over do not fit CI's 24 GiB), and
    the runs must not read each other's output across world sizes, nor among the one-rank
    runs."""
    by_world: dict[int, list] = {}
    for args, ranks in runs.values():
        by_world.setdefault(ranks, []).append([str(a) for a in args])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def start(world, arg_lists, tag=""):
        plan = Path(plan_dir) / f"plan_world{world}{tag}.json"
        plan.write_text(json.dumps(arg_lists))
        out, err = (open(Path(plan_dir) / f"plan_world{world}{tag}.{k}", "w+") for k in ("out", "err"))
        proc = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
                                 "--master_port", str(free_port()), "tests/checkpoint/many_runs.py", str(plan)],
                                cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        return proc, out, err

    def finish(launch):
        proc, out, err = launch
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
        out.close(), err.close()
        assert code == 0, text[-3000:] + errors[-5000:]

    ones = by_world.pop(1, []) if side_by_side else []
    first = [start(2, by_world.pop(2))] if side_by_side and 2 in by_world else []
    if ones:
        halves = [ones] if first or len(ones) == 1 else [ones[::2], ones[1::2]]
        first += [start(1, half, f"_{i}") for i, half in enumerate(halves)]
    try:
        for launch in first:
            finish(launch)
    finally:  # a failed launch: the others side by side with it end too
        for proc, *_ in first:
            if proc.poll() is None:
                proc.kill()
    for world, arg_lists in sorted(by_world.items()):
        finish(start(world, arg_lists))
