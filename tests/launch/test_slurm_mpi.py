"""Real launches on a one-machine SLURM cluster and under Open MPI, 2 CPU ranks (gloo).

Installs slurm-wlm, munge and openmpi-bin when missing (root, as in CI), starts munged,
slurmctld and slurmd from a generated slurm.conf, and stops them by pid at the end.

- train_srun.sbatch trains `tiny`, writes metrics and a checkpoint (the reference run);
- SIGTERM to the job's ranks (what SLURM sends on preemption or scancel) mid-run: every
  rank saves the current step and exits 75, the script requeues the job, and the rerun
  resumes from `latest` on the reference run's loss curve;
- SIGKILL of rank 1: srun ends the job within the documented bound and names task 1;
- `mpirun -np 2 python launch/train.py` and `deepspeed --launcher openmpi` reproduce the
  reference losses;
- prepare_data.sbatch as a 3-task array job prepares shards equal to one process's.
"""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_slurm import LocalSlurm, ensure_packages, free_port, job_env

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60  # a step of tiny takes ~0.2 s: the job must outlive the few seconds a signal takes to arrive
# zero1.json's AdamW as torch's (no C++ op to compile: ranks start in seconds)
DS_CONFIG = {**json.loads((ROOT / "ds_configs" / "zero1.json").read_text()), "bf16": {"enabled": False}}
DS_CONFIG["optimizer"]["params"]["torch_adam"] = True
TRAIN = ["--model", "tiny", "--precision", "fp32", "--seq-len", 128,
         "--micro-batch", 2, "--lr", 3e-3, "--warmup", 2, "--seed", 7, "--max-steps", STEPS,
         "--dist-timeout", 60]
DEAD_RANK_BOUND_S = 40  # srun --kill-on-bad-exit: at once; gloo peers fail as the socket drops


def metrics(save_dir) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed run appends)."""
    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


@pytest.fixture(scope="module")
def train_args(tmp_path_factory, tiny_data) -> list:
    ds = tmp_path_factory.mktemp("ds") / "zero1_torch_adam.json"
    ds.write_text(json.dumps(DS_CONFIG))
    return [*TRAIN, "--ds_config", ds, "--data", tiny_data]


def logged_steps(save_dir) -> int:
    f = Path(save_dir) / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def wait_for(cond, what: str, timeout: float, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module", autouse=True)
def packages():
    ensure_packages()


@pytest.fixture(scope="module")
def slurm(packages):
    cluster = LocalSlurm().start()
    yield cluster
    cluster.stop()


class Job:
    def __init__(self, slurm: LocalSlurm, log: Path, args: list, sbatch: tuple = ()):
        self.slurm, self.log = slurm, log
        out = slurm.run("sbatch", "--parsable", "--ntasks", "2", "--output", str(log), "--chdir", str(ROOT),
                        *sbatch, "launch/slurm/train_srun.sbatch", *map(str, args), check=True)
        self.id = out.stdout.strip().split(";")[0]

    def info(self) -> dict:
        text = self.slurm.run("scontrol", "-o", "show", "job", self.id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, timeout: float = 300) -> dict:
        wait_for(lambda: self.info().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                 f"job {self.id} to end", timeout, poll=0.5)
        return self.info()

    def rank_pid(self, rank: int) -> int:
        """pid of the task that runs `rank` (scontrol listpids: PID JOBID STEPID LOCALID GLOBALID)."""
        rows = [line.split() for line in self.slurm.run("scontrol", "listpids", self.id).stdout.splitlines()[1:]]
        pids = [int(r[0]) for r in rows if len(r) == 5 and r[2] == "0" and r[4] == str(rank)]
        assert pids, f"no task {rank} in job {self.id}: {rows}"
        return min(pids)  # the task itself, started before any child it spawned


@pytest.fixture(scope="module")
def reference(slurm, train_args, tmp_path_factory):
    """The uninterrupted run: train_srun.sbatch, 2 tasks, STEPS steps."""
    save = tmp_path_factory.mktemp("ref") / "run"
    job = Job(slurm, save.parent / "job.log", [*train_args, "--save-dir", save])
    info = job.wait()
    log = (save.parent / "job.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    return save, log


def test_srun_job_trains_and_checkpoints(reference):
    save, log = reference
    assert "2 ranks on localhost" in log
    rec = metrics(save)
    assert sorted(rec) == list(range(1, STEPS + 1))
    assert rec[STEPS]["loss"] < rec[1]["loss"]
    assert (save / "latest").read_text() == f"step{STEPS}"
    assert (save / f"step{STEPS}" / "megamm.json").is_file()


def test_sigterm_saves_the_current_step_and_the_resubmitted_job_continues_the_curve(slurm, reference, train_args,
                                                                                     tmp_path):
    """scancel --signal=TERM reaches every task of the job's steps (not the batch shell), as
    SLURM's preemption does: every rank saves the step it finished and exits 75. The job is
    submitted with --no-requeue (SLURM's own requeue of a running job raced the script's exit
    on this one-machine cluster: FAILED in some runs), so the batch script's `scontrol
    requeue` is refused and the job ends with 75; the same command submitted again resumes
    from `latest` (--auto-resume) on the uninterrupted curve."""
    save = tmp_path / "run"
    args = [*train_args, "--save-dir", save]
    job = Job(slurm, tmp_path / "job.log", args, sbatch=("--no-requeue",))
    wait_for(lambda: logged_steps(save) >= 2, "step 2 of the job", 300)
    slurm.run("scancel", "--signal=TERM", job.id, check=True)
    info = job.wait()
    log = (tmp_path / "job.log").read_text()
    assert info["ExitCode"] == "75:0", log[-4000:]
    stopped = re.search(r"preempted: stopped by SIGTERM after step (\d+) \(checkpoint (\S+)\)", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert 2 <= step < STEPS and stopped.group(2) == str(save / f"step{step}")
    assert f"megamm: preempted, requeueing job {job.id}" in log
    assert (save / "latest").read_text() == f"step{step}"  # the checkpoint of the stopped step
    again_job = Job(slurm, tmp_path / "again.log", args)
    info = again_job.wait()
    log = (tmp_path / "again.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert f"resumed from {save} at step {step}" in log
    assert (save / "latest").read_text() == f"step{STEPS}"
    ref, again = metrics(reference[0]), metrics(save)
    assert sorted(again) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert again[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s


def test_a_killed_rank_ends_the_job_within_the_bound_and_is_named(slurm, train_args, tmp_path):
    save = tmp_path / "run"
    job = Job(slurm, tmp_path / "job.log", [*train_args, "--max-steps", 1000, "--save-dir", save])
    wait_for(lambda: logged_steps(save) >= 1, "step 1 of the job", 300)
    import os

    os.kill(job.rank_pid(1), signal.SIGKILL)
    t0 = time.monotonic()
    info = job.wait(timeout=DEAD_RANK_BOUND_S + 30)
    took = time.monotonic() - t0
    log = (tmp_path / "job.log").read_text()
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 0, log[-4000:]
    assert took < DEAD_RANK_BOUND_S, (took, log[-4000:])
    assert re.search(r"srun: error: localhost: task 1: Killed", log), log[-4000:]
    assert logged_steps(save) < 1000


MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "MASTER_PORT", sys.executable, "-u"]


def mpi_cmd(train_args, save, launcher: list, **popen):
    cmd = [*launcher, "launch/train.py", *map(str, train_args), "--save-dir", str(save), "--no-progress"]
    env = {**job_env(), "MASTER_PORT": str(free_port())}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_mpirun_reproduces_the_srun_losses(reference, train_args, tmp_path):
    proc = mpi_cmd(train_args, tmp_path / "run", MPIRUN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, got = metrics(reference[0]), metrics(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s


def test_deepspeed_openmpi_launcher_reproduces_the_srun_losses(reference, train_args, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = mpi_cmd(train_args, tmp_path / "run", [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--launcher", "openmpi",
        "--no_ssh_check", "--force_multi", "--master_addr", "127.0.0.1",
        "--launcher_args=--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, got = metrics(reference[0]), metrics(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s


def test_mpirun_ends_the_job_when_a_rank_dies_and_names_it(train_args, tmp_path):
    import psutil

    save, log = tmp_path / "run", tmp_path / "mpirun.log"
    with open(log, "w") as out:
        proc = mpi_cmd([*train_args, "--max-steps", 1000], save, MPIRUN, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: logged_steps(save) >= 1, "step 1 under mpirun", 300)
        ranks = {int(p.environ().get("OMPI_COMM_WORLD_RANK", -1)): p
                 for p in psutil.Process(proc.pid).children(recursive=True) if p.name().startswith("python")}
        ranks[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        status = proc.wait(timeout=DEAD_RANK_BOUND_S + 30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert status != 0 and took < DEAD_RANK_BOUND_S, (status, took, text[-3000:])
    assert re.search(r"process rank 1 with PID \d+ on node \S+ exited on signal 9", text), text[-3000:]


def test_prepare_array_job_merges_into_the_one_process_shards(slurm, quick_tokenizers_dir, tmp_path):
    """launch/slurm/prepare_data.sbatch as a 3-task array job: each task writes its slice
    (from SLURM_ARRAY_TASK_ID / _COUNT), the last one merges; the result equals a
    one-process tools/prepare_data.py run byte for byte."""
    from megamm.demo import digits

    manifest = digits.export_manifest(tmp_path / "input", split="val", limit=12)
    args = [str(manifest), "--tokenizers", str(quick_tokenizers_dir), "--shard-size", "3", "--seed", "1",
            "--val-fraction", "0.3"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    one = subprocess.run([sys.executable, "tools/prepare_data.py", *args, "--out", str(ref), "--quiet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    job = slurm.run("sbatch", "--parsable", "--array=0-2", "--output", str(tmp_path / "task-%a.log"),
                    "--chdir", str(ROOT), "launch/slurm/prepare_data.sbatch", *args, "--out", str(out),
                    check=True).stdout.strip().split(";")[0]
    wait_for(lambda: not slurm.run("squeue", "-h", "-j", job).stdout.strip(), f"array job {job} to end", 300, 0.5)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("task-*.log")))
    assert (out / "meta.json").is_file() and not (out / ".prep").exists(), logs[-4000:]
    assert logs.count("megamm: prepare slice") == 3 and logs.count("tokens per modality") == 1, logs[-4000:]
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and len(names) >= 9  # 4 shards + meta.json
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
