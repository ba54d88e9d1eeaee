"""Node lists, srun task variables and MPI hand-off -> the torch.distributed environment."""
import sys
import types

import pytest

from megamm.parallel import cluster
from megamm.parallel.cluster import ClusterError, expand_nodelist, expand_tasks_per_node


@pytest.mark.parametrize("text, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("localhost", ["localhost"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("x[1,3],y,z[05]", ["x1", "x3", "y", "z05"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, culprit", [
    ("node[01-03", "without ']'"), ("node01]", "without '['"), ("node[3-1]", "backwards"),
    ("node[a-b]", "bad range 'a-b'"), ("", "empty"), ("a,,b", "empty host"), ("n[[1]]", "nested"),
])
def test_bad_nodelist_is_named(text, culprit):
    with pytest.raises(ClusterError, match=culprit.replace("[", r"\[")):
        expand_nodelist(text)


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ClusterError, match="2x"):
        expand_tasks_per_node("2x")


def srun_task(procid, localid, nodeid, **extra):
    return {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), "SLURM_STEP_NUM_TASKS": "7",
            "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NODELIST": "node[01-03,07]", **extra}


def test_srun_task_gets_rank_and_master_from_the_first_node():
    env = srun_task(6, 0, 3)
    set_ = cluster.set_rank_env(env)
    assert set_ == cluster.DistEnv(rank=6, world_size=7, local_rank=0, local_world_size=1,
                                   master_addr="node01", master_port=20000 + 4242)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "6", "WORLD_SIZE": "7", "LOCAL_RANK": "0", "MASTER_ADDR": "node01", "MASTER_PORT": "24242"}
    other = srun_task(3, 1, 1)
    cluster.set_rank_env(other)
    assert (other["MASTER_ADDR"], other["MASTER_PORT"], other["LOCAL_WORLD_SIZE"]) == ("node01", "24242", "2")


def test_explicit_master_wins_and_launcher_variables_are_kept():
    env = srun_task(0, 0, 0, MASTER_ADDR="10.0.0.5", MASTER_PORT="12345")
    cluster.set_rank_env(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "12345")
    launched = srun_task(0, 0, 0, RANK="3")  # deepspeed's per-node launcher already set the rank
    assert cluster.set_rank_env(launched) is None and launched["RANK"] == "3"
    assert "WORLD_SIZE" not in launched


def test_batch_shell_is_not_an_srun_task():
    batch = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1"}
    assert cluster.set_rank_env(batch) is None and "RANK" not in batch


def test_mpirun_ranks_are_left_to_mpi_discovery(monkeypatch):
    """Even inside a SLURM step (mpirun's daemons run as srun tasks) the MPI ranks win."""
    mpi = srun_task(0, 0, 0, OMPI_COMM_WORLD_RANK="1")
    monkeypatch.setitem(sys.modules, "mpi4py", types.ModuleType("mpi4py"))
    assert cluster.set_rank_env(mpi) is None and "RANK" not in mpi
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not installed
    with pytest.raises(ClusterError, match=r"mpi4py is missing .*pip install 'megamm\[mpi\]'"):
        cluster.set_rank_env(mpi)
    assert cluster.mpi_port({}) == 29500 and cluster.mpi_port({"MASTER_PORT": "2345"}) == 2345


def test_bad_variables_are_named():
    with pytest.raises(ClusterError, match="MASTER_PORT='http'"):
        cluster.master_port({"MASTER_PORT": "http"})
    with pytest.raises(ClusterError, match="SLURM_JOB_ID"):
        cluster.master_port({})
    with pytest.raises(ClusterError, match="rank 7 outside world size 7"):
        cluster.slurm_env(srun_task(7, 0, 3))
    with pytest.raises(ClusterError, match="SLURM_NODEID=4"):
        cluster.slurm_env(srun_task(0, 0, 4))


def test_cli_env_and_hostfile(capsys):
    job = {"SLURM_JOB_ID": "17", "SLURM_JOB_NODELIST": "a1,b[2-3]"}
    assert cluster.main(["env"], job) == 0
    assert capsys.readouterr().out == "export MASTER_ADDR=a1\nexport MASTER_PORT=20017\nexport NNODES=3\n"
    assert cluster.main(["hostfile", "--slots", "8"], job) == 0
    assert capsys.readouterr().out == "a1 slots=8\nb2 slots=8\nb3 slots=8\n"
    assert cluster.main(["env"], {"SLURM_JOB_ID": "1"}) == 2
    assert capsys.readouterr().err.strip() == "error: SLURM_JOB_NODELIST is not set (not inside a SLURM job)"
