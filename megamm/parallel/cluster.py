"""Where a job's ranks come from: SLURM's variables -> the torch.distributed environment.

torch.distributed (and DeepSpeed) read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. Launchers that do not set them describe the job in their own words:

- `srun` (one task per rank): SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NUM_TASKS,
  SLURM_STEP_TASKS_PER_NODE ("2(x3),1") and SLURM_STEP_NODELIST ("node[01-03,07]").
  These exist only inside an srun step, never in the batch shell, so a plain `python` in a
  batch script is not mistaken for rank 0 of many.
- `mpirun` (OMPI_COMM_WORLD_RANK / PMI_RANK set): left to DeepSpeed's MPI discovery
  (mpi4py), which this module only points at MASTER_PORT when one is given.

The rendezvous host is the first node of the list; the port is MASTER_PORT when set, else
derived from the job id (`MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN`) so that every node
of a job computes the same one and two jobs sharing a first node rarely collide.

As a command, for batch scripts (prints shell lines to `eval`, or a DeepSpeed hostfile):

    python -m megamm.parallel.cluster env                 # export MASTER_ADDR=... MASTER_PORT=...
    python -m megamm.parallel.cluster hostfile --slots 8  # node01 slots=8 ...
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from megamm.config import ConfigError

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 20000


class ClusterError(ConfigError):
    """A node list or launcher environment that cannot be read."""


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets; unbalanced brackets are an error."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ClusterError(f"node list {text!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ClusterError(f"node list {text!r}: ']' without '['")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ClusterError(f"node list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_ranges(spec: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding of the lower bound kept)."""
    out = []
    for part in spec.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ClusterError(f"node list {whole!r}: bad range {part!r}")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ClusterError(f"node list {whole!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list -> host names in order.

    'node[01-03,07]' -> node01 node02 node03 node07; 'a1,b[2-3]' -> a1 b2 b3;
    'r[1-2]-n[1-2]' -> r1-n1 r1-n2 r2-n1 r2-n2.
    """
    text = text.strip()
    if not text:
        raise ClusterError("node list is empty")
    hosts: list[str] = []
    for item in _split_top_level(text):
        if not item:
            raise ClusterError(f"node list {text!r}: empty host name")
        names = [""]
        for piece in re.split(r"(\[[^\]]*\])", item):
            if piece.startswith("["):
                names = [n + r for n in names for r in _expand_ranges(piece[1:-1], text)]
            elif piece:
                names = [n + piece for n in names]
        hosts += names
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM's '2(x3),1' -> [2, 2, 2, 1]."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ClusterError(f"tasks per node {text!r}: cannot read {part!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def master_port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port derived from SLURM_JOB_ID (same on every node)."""
    if "MASTER_PORT" in environ:
        port = environ["MASTER_PORT"]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ClusterError(f"MASTER_PORT={port!r} is not a port number")
        return int(port)
    job = environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        raise ClusterError("no MASTER_PORT and no numeric SLURM_JOB_ID to derive one from")
    return MASTER_PORT_BASE + int(job) % MASTER_PORT_SPAN


@dataclass(frozen=True)
class DistEnv:
    """What torch.distributed needs to start one rank."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ClusterError(f"rank {self.rank} outside world size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ClusterError(f"local rank {self.local_rank} outside {self.local_world_size} ranks on this node")
        if not self.master_addr:
            raise ClusterError("empty master address")

    def variables(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "LOCAL_SIZE": str(self.local_world_size),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    if not value.isdigit():
        raise ClusterError(f"{name}={value!r} is not a non-negative integer")
    return int(value)


def slurm_env(environ: Mapping[str, str]) -> DistEnv | None:
    """The rank of an srun task (None outside an srun step)."""
    if "SLURM_STEP_NUM_TASKS" not in environ or "SLURM_PROCID" not in environ:
        return None
    nodes = expand_nodelist(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", ""))
    per_node = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", environ["SLURM_STEP_NUM_TASKS"]))
    node = _int(environ, "SLURM_NODEID")
    if node >= len(per_node):
        raise ClusterError(f"SLURM_NODEID={node} but tasks are listed for {len(per_node)} nodes")
    return DistEnv(rank=_int(environ, "SLURM_PROCID"), world_size=_int(environ, "SLURM_STEP_NUM_TASKS"),
                   local_rank=_int(environ, "SLURM_LOCALID"), local_world_size=per_node[node],
                   master_addr=environ.get("MASTER_ADDR") or nodes[0], master_port=master_port(environ))


def launched_by_mpi(environ: Mapping[str, str]) -> bool:
    return "OMPI_COMM_WORLD_RANK" in environ or "PMI_RANK" in environ


def set_rank_env(environ) -> DistEnv | None:
    """Fill RANK & co. in `environ` (os.environ) from an srun step, unless a launcher already did.

    Under mpirun (even inside a SLURM job, where mpirun's daemons run as srun tasks) the
    ranks are left to DeepSpeed's MPI discovery, which needs mpi4py; its absence is reported
    here in one line. Returns what was set from SLURM, else None."""
    if "RANK" in environ:
        return None
    if launched_by_mpi(environ):
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise ClusterError("launched by mpirun but mpi4py is missing (DeepSpeed finds the ranks "
                               "through it): pip install 'megamm[mpi]'") from None
        return None
    env = slurm_env(environ)
    if env is not None:
        environ.update(env.variables())
    return env


def mpi_port(environ: Mapping[str, str], default: int = 29500) -> int:
    """Port for DeepSpeed's MPI discovery: MASTER_PORT (e.g. `mpirun -x MASTER_PORT=...`) or its default."""
    return master_port(environ) if "MASTER_PORT" in environ else default


def hostfile(nodes: list[str], slots: int) -> str:
    """A DeepSpeed hostfile: one 'host slots=N' line per node."""
    if slots < 1:
        raise ClusterError(f"slots per node must be >= 1, got {slots}")
    return "".join(f"{n} slots={slots}\n" for n in nodes)


def _job_nodes(environ: Mapping[str, str]) -> list[str]:
    text = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not text:
        raise ClusterError("SLURM_JOB_NODELIST is not set (not inside a SLURM job)")
    return expand_nodelist(text)


def main(argv=None, environ: Mapping[str, str] | None = None) -> int:
    import os

    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m megamm.parallel.cluster",
                                description="Rendezvous settings of a SLURM job, for batch scripts.")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("env", help="shell 'export' lines: MASTER_ADDR, MASTER_PORT, NNODES")
    h = sub.add_parser("hostfile", help="a DeepSpeed hostfile of the job's nodes")
    h.add_argument("--slots", type=int, required=True, help="ranks (GPUs) per node")
    args = p.parse_args(argv)
    try:
        nodes = _job_nodes(environ)
        if args.what == "hostfile":
            sys.stdout.write(hostfile(nodes, args.slots))
        else:
            values = {"MASTER_ADDR": environ.get("MASTER_ADDR") or nodes[0],
                      "MASTER_PORT": master_port(environ), "NNODES": len(nodes)}
            sys.stdout.write("".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in values.items()))
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
