"""A one-machine SLURM cluster (munged + slurmctld + slurmd on localhost) for the launch tests,
and the Debian packages it needs.

`LocalSlurm().start()` writes a private slurm.conf in a new directory under /tmp, starts the three daemons
in the foreground as children of this process and waits until the node is idle; `stop()`
terminates exactly the processes it started, by pid, and removes the directory. Clients (sbatch, squeue, scontrol) find
the cluster through SLURM_CONF in `env()`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = {"sbatch": "slurm-wlm", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm",
            "munged": "munge", "mpirun": "openmpi-bin"}
SBIN = ("/usr/sbin", "/usr/bin")


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def ensure_packages() -> None:
    """apt-get install whatever of slurm-wlm, munge, openmpi-bin is missing (mpi4py, in the dev
    extra, is a binary wheel that finds Open MPI's library at run time)."""
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if which(cmd) is None})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env, capture_output=True)


def job_env() -> dict:
    """This environment for a job: the test's python first on PATH, no Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=megammtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
KillWait={kill_wait}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


class LocalSlurm:
    def __init__(self, cpus: int = 2, kill_wait: int = 30):
        # munged (user munge) must reach its directory: not under pytest's 0700 tmp dirs
        self.root = Path(tempfile.mkdtemp(prefix="megamm-slurm-"))
        self.cpus, self.kill_wait = cpus, kill_wait
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict:
        return {**job_env(), "SLURM_CONF": str(self.root / "slurm.conf")}

    def start(self) -> "LocalSlurm":
        r = self.root
        r.chmod(0o755)
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        munge = r / "munge"
        munge.mkdir(exist_ok=True)
        munge.chmod(0o755)  # munged insists on its socket directory being searchable by all
        shutil.chown(munge, "munge", "munge")
        sock = munge / "munge.socket"
        self._spawn([which("munged"), "-F", f"--socket={sock}", f"--pid-file={munge}/munged.pid",
                     f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
                    user="munge", group="munge")
        self._wait(lambda: sock.exists(), "munged socket")
        (r / "slurm.conf").write_text(SLURM_CONF.format(
            root=r, munge_socket=sock, ctld_port=free_port(), slurmd_port=free_port(),
            cpus=self.cpus, kill_wait=self.kill_wait))
        env = self.env()
        for cmd in ([which("slurmctld"), "-D", "-i"], [which("slurmd"), "-D", "-N", "localhost"]):
            self._spawn(cmd, env=env)
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, "node idle")
        return self

    def _spawn(self, cmd: list[str], **kw) -> None:
        with open(self.root / "log" / f"{Path(cmd[0]).name}.out", "ab") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw))

    def _wait(self, ready, what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} before {what}; logs in {self.root}")
            if time.monotonic() > end:
                raise RuntimeError(f"timed out waiting for {what}; logs in {self.root}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, check=check)

    def stop(self) -> None:
        """Cancel the jobs left (a failed test's), then end the daemons, by pid."""
        if any(p.poll() is None for p in self.procs):
            self.run("scancel", "--user=root")
            end = time.monotonic() + 60
            while self.run("squeue", "-h").stdout.strip() and time.monotonic() < end:
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
