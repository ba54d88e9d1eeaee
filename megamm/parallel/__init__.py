"""Process-group topology and (later) the tensor/pipeline-parallel layers."""
from megamm.parallel.topology import Topology

__all__ = ["Topology"]
