"""Surviving bad steps: a step whose loss or gradient norm is not finite changes nothing,
is counted, and too many in a row stop the run.

DeepSpeed does the skip itself (megamm.checkpoint.ds.hooks says how, per ZeRO stage and
precision); megamm does not re-implement it. `prepare_config` switches it on (refusing
configs where DeepSpeed cannot skip), and BadStepGuard feeds it and counts it:
  - `loss_for_backward(loss, step)`: a non-finite micro-batch loss becomes NaN
    gradients (the loss times NaN), so a bad loss on any rank is a bad gradient norm
    on every rank after the reduction;
  - `after_step(engine)` -> {"skipped_steps": total}: whether DeepSpeed applied the step;
  - `may_save()`: False while the last step was skipped, so every checkpoint follows
    an applied step and the last good one is never replaced by a later one;
  - `stop_if_exhausted()`: BadStepsError after `max_bad` consecutive skipped steps.

Fault injection (tests only): MEGAMM_FAULT_NAN_STEPS="3,5-7" (optimizer steps,
counted from 1 like the metrics' "step") makes those steps' gradients NaN. It is read
once, by `BadStepGuard.from_env` when a run starts, and announced on rank 0's stderr.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from megamm.checkpoint.ds import hooks
from megamm.config import ConfigError

FAULT_ENV = "MEGAMM_FAULT_NAN_STEPS"


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


prepare_config = hooks.enable_step_skip
"""ds_cfg with DeepSpeed's non-finite-gradient skip on; ConfigError where it cannot skip."""


def parse_steps(text: str) -> frozenset[int]:
    """'3,5-7' -> {3, 5, 6, 7}; ConfigError naming the variable on anything else."""
    steps: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 1 or last < first:
                raise ValueError
            steps.update(range(first, last + 1))
    except ValueError:
        raise ConfigError(f"{FAULT_ENV}={text!r}: expected steps like '3,5-7' (counted from 1)") from None
    return frozenset(steps)


@dataclass
class BadStepGuard:
    max_bad: int = 10
    """Consecutive skipped steps that stop the run."""
    fault_steps: frozenset[int] = frozenset()
    """Steps whose gradients are made NaN on purpose (fault injection)."""
    consecutive: int = 0
    """Skipped steps since the last applied one."""
    first_bad: int = 0
    """The first step of the current run of skipped steps."""

    def __post_init__(self):
        if self.max_bad < 1:
            raise ConfigError(f"--max-bad-steps out of range: {self.max_bad}")

    @classmethod
    def from_env(cls, max_bad: int, rank: int, environ=os.environ) -> "BadStepGuard":
        steps = parse_steps(environ.get(FAULT_ENV, ""))
        if steps and rank == 0:
            print(f"fault injection: NaN gradients at step(s) {','.join(map(str, sorted(steps)))} "
                  f"({FAULT_ENV})", file=sys.stderr, flush=True)
        return cls(max_bad=max_bad, fault_steps=steps)

    def loss_for_backward(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to back-propagate in optimizer step `step` (from 1): NaN-poisoned when
        it is not finite (or the step is an injected fault), so DeepSpeed skips the step."""
        if step in self.fault_steps:
            return loss * float("nan")
        nan = torch.tensor(float("nan"), dtype=loss.dtype, device=loss.device)
        return loss * torch.where(torch.isfinite(loss.detach()), torch.ones_like(nan), nan)  # no host sync

    def after_step(self, engine, step: int) -> dict:
        """Record whether optimizer step `step` was applied; the metrics it adds."""
        if hooks.step_applied(engine):
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.first_bad = step if self.consecutive == 1 else self.first_bad
        return {"skipped_steps": hooks.skipped_steps(engine)}

    def may_save(self) -> bool:
        return self.consecutive == 0

    def stop_if_exhausted(self) -> None:
        if self.consecutive >= self.max_bad:
            raise BadStepsError(
                f"stopping: {self.consecutive} consecutive steps ({self.first_bad}-"
                f"{self.first_bad + self.consecutive - 1}) had a non-finite loss or gradient norm and were skipped "
                f"(--max-bad-steps {self.max_bad}); the newest checkpoint is from step {self.first_bad - 1} or earlier")
