"""Parallel degrees of a run, and the process groups built from them.

`Topology(tp, pp, dp)` is one validated dataclass: no process groups at import, testable
without a launcher. `Topology.build_groups()` (after torch.distributed is initialised)
returns `ParallelGroups`: the `mpu` object handed to `deepspeed.initialize`, and the
groups megamm's tensor-parallel layers and loss reduce over.

Rank layout (the same as deepspeed.pipe's PipeModelDataParallelTopology, axes
pipe > data > model, so a pipeline engine built over the same degrees agrees):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megamm.config import ConfigError


@dataclass(frozen=True)
class Topology:
    tp: int = 1
    """Tensor-parallel degree (ranks sharing one layer's weights)."""
    pp: int = 1
    """Pipeline-parallel degree (stages)."""
    dp: int = 1
    """Data-parallel degree (replicas of the tp x pp model)."""

    def __post_init__(self):
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel degree {name} must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> "Topology":
        """dp = world_size / (tp * pp); refuses sizes that do not divide."""
        if tp < 1 or pp < 1:
            raise ConfigError(f"--tp and --pp must be >= 1, got tp={tp} pp={pp}")
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by --tp x --pp = {tp} x {pp}; "
                              f"launch a multiple of {tp * pp} ranks")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (pp_rank, dp_rank, tp_rank)."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def group_ranks(self, axis: str) -> list[list[int]]:
        """Every group of ranks that differ only along `axis` ("tp", "dp" or "pp")."""
        r = self.rank_of
        if axis == "tp":
            return [[r(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]
        if axis == "dp":
            return [[r(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]
        if axis == "pp":
            return [[r(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]
        raise ValueError(f"no parallel axis {axis!r}")

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} (world {self.world_size})"

    def build_groups(self) -> "ParallelGroups":
        """Create the tp, dp and pp process groups (every rank must call this)."""
        return ParallelGroups(self)


class ParallelGroups:
    """The process groups of a Topology for this rank; DeepSpeed's `mpu` interface.

    DeepSpeed's "model parallel" group is our tensor-parallel group (gradient norms and
    clipping sum the TP-sharded parameters over it and count replicated ones once)."""

    def __init__(self, topo: Topology):
        if dist.get_world_size() != topo.world_size:
            raise ConfigError(f"world size {dist.get_world_size()} != tp*pp*dp = {topo.world_size}")
        self.topo, self.rank = topo, dist.get_rank()
        self.pp_rank, self.dp_rank, self.tp_rank = topo.coords(self.rank)
        self._groups, self._ranks = {}, {}
        for axis in ("tp", "dp", "pp"):  # every rank creates every group, in one order
            for ranks in topo.group_ranks(axis):
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self._groups[axis], self._ranks[axis] = g, ranks

    # megamm's own names
    @property
    def tp_group(self):
        return self._groups["tp"] if self.topo.tp > 1 else None

    @property
    def dp_group(self):
        return self._groups["dp"]

    def is_last_stage(self) -> bool:
        return self.pp_rank == self.topo.pp - 1

    # DeepSpeed's mpu interface
    def get_model_parallel_group(self):
        return self._groups["tp"]

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ranks["tp"][0]

    def get_data_parallel_group(self):
        return self._groups["dp"]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._ranks["dp"])

    def get_pipe_parallel_group(self):
        return self._groups["pp"]

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.topo.pp
