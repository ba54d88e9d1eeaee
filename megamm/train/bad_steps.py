"""Surviving bad steps: a step whose loss or gradient norm is not finite changes nothing,
is counted, and too many in a row stop the run.

How the skip happens (DeepSpeed 0.19.8, read from its source). At the gradient
accumulation boundary each optimizer wrapper checks the gradients before it touches
any state, and on inf/NaN clears them and returns: fp32 master weights, the bf16/fp16
copies, the Adam moments and step count stay as they were; the engine then counts
`engine.skipped_steps`, reports `engine.was_step_applied() == False` and does not step
the LR scheduler.
  - ZeRO-1/2 (zero/stage_1_and_2.py `step`): `check_overflow()` when
    `check_grad_overflow` (fp16 always; bf16 from `bf16.check_grad_overflow`, default
    true; fp32 never), and a non-finite global norm counts as overflow unless the
    dtype is bf16 with the check off;
  - ZeRO-3 (zero/stage3.py `step`): a non-finite global norm, any dtype;
  - ZeRO-0 bf16 (bf16_optimizer.py `step`) and fp16 (the loss scaler): the same;
  - ZeRO-0 fp32: the torch optimizer steps unconditionally; no skip exists.
So megamm does not re-implement the skip: `prepare_config` makes sure DeepSpeed's is
on (and refuses ZeRO-0 fp32), and BadStepGuard feeds it and counts it:
  - `loss_for_backward(loss, step)`: a non-finite micro-batch loss becomes NaN
    gradients (the loss times NaN), so a bad loss on any rank is a bad gradient norm
    on every rank after the reduction;
  - `after_step(engine)` -> {"skipped_steps": total}: reads was_step_applied();
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

from megamm.config import ConfigError

FAULT_ENV = "MEGAMM_FAULT_NAN_STEPS"


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def prepare_config(ds_cfg: dict) -> dict:
    """ds_cfg with DeepSpeed's non-finite-gradient skip switched on; ConfigError where
    DeepSpeed cannot skip a step (ZeRO-0 in fp32) or the config turns the check off."""
    stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    bf16, fp16 = ds_cfg.get("bf16", {}), ds_cfg.get("fp16", {})
    if bf16.get("enabled"):
        if bf16.get("check_grad_overflow") is False:
            raise ConfigError("bf16.check_grad_overflow is false in the DeepSpeed config: steps with "
                              "non-finite gradients would be applied; remove it")
        ds_cfg = {**ds_cfg, "bf16": {**bf16, "check_grad_overflow": True}}
    elif stage == 0 and not fp16.get("enabled"):
        raise ConfigError("ZeRO stage 0 in fp32 cannot skip a step with non-finite gradients; "
                          "use ZeRO stage >= 1 or bf16/fp16")
    return ds_cfg


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
        if engine.was_step_applied():
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.first_bad = step if self.consecutive == 1 else self.first_bad
        return {"skipped_steps": int(engine.skipped_steps)}

    def may_save(self) -> bool:
        return self.consecutive == 0

    def stop_if_exhausted(self) -> None:
        if self.consecutive >= self.max_bad:
            raise BadStepsError(
                f"stopping: {self.consecutive} consecutive steps ({self.first_bad}-"
                f"{self.first_bad + self.consecutive - 1}) had a non-finite loss or gradient norm and were skipped "
                f"(--max-bad-steps {self.max_bad}); the newest checkpoint is from step {self.first_bad - 1} or earlier")
