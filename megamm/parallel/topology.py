"""Parallel degrees of a run: one validated dataclass, no process groups at import.

Only data parallelism (tp = pp = 1) is wired into training so far; tensor- and
pipeline-parallel layers build on the same object.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamm.config import ConfigError


@dataclass(frozen=True)
class Topology:
    tp: int = 1
    pp: int = 1
    dp: int = 1

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
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} (world {self.world_size})"
