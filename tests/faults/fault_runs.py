"""Launching real 2-rank training runs that the fault tests kill, starve of disk or
poison. (A module with its own name, not conftest: `from conftest import` resolves to
whichever conftest.py pytest loaded last.)"""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
RUN = ["--ds_config", "zero2.json", "--seq-len", 128, "--micro-batch", 2, "--warmup", 2, "--lr", 5e-3,
       "--seed", 7, "--save-interval", 1, "--no-progress"]
"""Every fault run: tiny, ZeRO-2, bf16, 2 ranks, a checkpoint after every step."""
STEPS = 8


def clean_env(**extra) -> dict:
    """This environment without TRITON_INTERPRET (tests/conftest.py sets it for the kernel
    tests; it is still set while module and session fixtures run)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | extra


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One `deepspeed --num_gpus 2 launch/train.py` in its own session, output to a log file."""

    def __init__(self, args, log: Path, env: dict | None = None, file_limit: int | None = None):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(_port()), "launch/train.py", *map(str, [*RUN, *args])]
        environ = clean_env(**(env or {}))
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=(lambda: _limit_file_size(file_limit)) if file_limit else None)

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not finish in {timeout} s (hung?): {self.output()[-3000:]}")
        return rc, self.output()

    def kill(self) -> None:
        """kill -9 of the launcher and every rank."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def kill_when(self, ready, timeout: float = 600) -> None:
        """kill -9 as soon as ready() is true (polled every 10 ms)."""
        deadline = time.time() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (status {self.proc.returncode}) before the moment to kill it: "
                            f"{self.output()[-3000:]}")
            if time.time() > deadline:
                self.kill()
                pytest.fail("the moment to kill the run never came")
            time.sleep(0.01)
        self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _limit_file_size(limit: int) -> None:
    """In the child: writes past `limit` bytes fail with EFBIG instead of killing it (SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def curve(save_dir: Path) -> dict[int, dict]:
    """step -> the last record logged for it (resumed runs append)."""
    lines = (Path(save_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, filter(None, lines))}


def latest_step(save_dir: Path) -> int:
    f = Path(save_dir) / "latest"
    return int(f.read_text().removeprefix("step")) if f.is_file() else 0


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]
