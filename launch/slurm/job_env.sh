# Sourced by train.sbatch and train_srun.sbatch: the one place that sets a job's
# rendezvous and communication environment. Needs the python that has megamm installed
# on PATH (activate the venv before `sbatch`: sbatch passes the environment on).
#
#   MASTER_ADDR  first node of the job's node list (SLURM_JOB_NODELIST)
#   MASTER_PORT  MASTER_PORT if already set, else 20000 + job id % 20000
#   NNODES       nodes in the job
eval "$(python -m megamm.parallel.cluster env)" || exit 2
export PYTHONUNBUFFERED=1
# A failed or timed-out NCCL collective aborts the rank instead of hanging the allocation
# (GPU jobs; gloo, the CPU backend, fails on its own when a peer's connection drops).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME here when the nodes' default route is not
# the network the ranks should talk over, e.g. export NCCL_SOCKET_IFNAME=ib0.

# Exit status 75 = the ranks stopped on SIGTERM/SIGUSR1 after saving (megamm/train/preemption.py):
# put the job back in the queue; the rerun resumes from `latest` (--auto-resume).
requeue_if_preempted() {
  if [ "$1" -eq 75 ]; then
    echo "megamm: preempted, requeueing job $SLURM_JOB_ID"
    # The requeue ends this script (the job goes back to PENDING); exiting on our own
    # first races it, and SLURM may then record the job as FAILED instead.
    scontrol requeue "$SLURM_JOB_ID" && sleep 300
  fi
  exit "$1"
}
