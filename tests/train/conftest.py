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


def run_many(runs: dict[str, tuple[list, int]], plan_dir: Path, timeout=1500) -> None:
    """Several launch/train.py argument lists, {name: (args, ranks)}, in one launch per world
    size (tests/checkpoint/many_runs.py: each run goes through the trainer's own run(), one
    after another in the same processes), in the dict's order within a world size. Asserts
    every launch succeeded. Shares DeepSpeed's start-up between the runs of a fixture."""
    by_world: dict[int, list] = {}
    for args, ranks in runs.values():
        by_world.setdefault(ranks, []).append([str(a) for a in args])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for world, arg_lists in sorted(by_world.items()):
        plan = Path(plan_dir) / f"plan_world{world}.json"
        plan.write_text(json.dumps(arg_lists))
        proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
                               "--master_port", str(free_port()), "tests/checkpoint/many_runs.py", str(plan)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
