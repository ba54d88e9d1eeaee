"""Process-group set-up shared by training and the tools: one place that knows how a
rank finds its peers (launcher variables, or none for a single process), which backend
to use, and the few collectives the loop needs outside the engine."""
from __future__ import annotations

import atexit
import gc
import logging
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from megamm.parallel import cluster


def single_process_env() -> None:
    """`python launch/train.py` without a launcher: make this process rank 0 of 1."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Initialise torch.distributed through DeepSpeed on this rank's accelerator and
    return the device this rank computes on. Ranks come from the launcher's variables
    (deepspeed, torchrun, srun tasks via megamm.parallel.cluster, mpirun via mpi4py), or
    this is a single process. A collective waits at most `timeout_s` for a silent rank.
    CPU ranks use gloo (the CPU accelerator prefers oneCCL, which a CPU torch wheel does
    not have) and share the machine's cores."""
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    acc = get_accelerator()
    backend = acc.communication_backend_name()
    if backend == "ccl":
        backend = "gloo"
    cluster.set_rank_env(os.environ)  # srun tasks: RANK & co. from SLURM's variables
    single_process_env()
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                               distributed_port=cluster.mpi_port(os.environ))
    device = torch.device(acc.device_name(acc.current_device()))
    buffer = shm_buffer_path()
    if buffer is not None:  # the op may create it after this point: unlink whatever is there at exit
        atexit.register(_unlink_quietly, buffer)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one machine share its cores; oversubscribed threads crawl
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return device


def shm_buffer_path() -> Path | None:
    """The shared-memory file DeepSpeed's CPU allreduce op creates for this rank
    (`/dev/shm/deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>`), or
    None without a master address. DeepSpeed never unlinks it, so each CPU run would leave
    ~70 MB of RAM per rank in /dev/shm until a reboot; init_distributed unlinks it at exit
    (peers keep their mappings)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and dist.is_initialized()):
        return None
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over `group` (default: every rank); a no-op in a single process."""
    if is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def shutdown() -> None:
    """Leave the process groups together before the interpreter exits: every rank waits
    for the others, then destroys its groups, so no rank's communication threads are torn
    down while a peer still talks to them (that aborts the process instead of exiting
    with its status)."""
    if is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a dead peer: the exit status still says what happened here
            pass
        # A gloo worker thread drops its last finished work (and the Python tensors it
        # holds) just after the barrier returns; if the interpreter is already finalizing
        # then, taking the GIL ends that thread and std::terminate aborts the process
        # (exit 134 after a finished run).
        # Let it happen while the interpreter is still whole.
        gc.collect()
        time.sleep(0.2)
