"""Parallel layouts applied to the plain model: the process-group topology (the `mpu`
DeepSpeed expects), tensor-parallel sharding, pipeline stages, and process set-up."""
from megamm.parallel.tensor_parallel import SHARD_PLAN, TensorParallel, merge_shards, parallelize, shard_dim
from megamm.parallel.topology import ParallelGroups, Topology

__all__ = ["Topology", "ParallelGroups", "TensorParallel", "parallelize", "SHARD_PLAN", "shard_dim",
           "merge_shards"]
