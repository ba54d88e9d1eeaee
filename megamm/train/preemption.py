"""Stopping a job cleanly when the cluster asks: every rank ends the same step, saves, exits.

SLURM sends SIGTERM when it preempts or cancels a job (and, `KillWait` seconds later,
SIGKILL), and the signal chosen with `sbatch --signal=USR1@<seconds>` ahead of the time
limit. A rank that receives SIGTERM or SIGUSR1 only records it (nothing else is safe inside
a signal handler). After every optimizer step all ranks call `StopRequest.agreed()`, one
all-reduce (MAX) of a one-element flag, so every rank learns of a signal that reached any
of them and all stop after the same step, whichever ranks the signal reached and when.

The handler is installed when the training loop starts: a signal before that ends the
process as usual (nothing trained yet that a save could keep), so a rank stuck in start-up
cannot ignore it.

The loop then saves the checkpoint of that step and raises `Preempted`; launch/train.py
prints one line and exits with PREEMPTED_EXIT (75, EX_TEMPFAIL: "stopped early, try again").
The job's script requeues on that status and the next run resumes from `latest` on the same
loss curve. A signal that arrives during the last step changes nothing: the run completes.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the checkpoint of `step` is saved because a stop signal arrived."""

    def __init__(self, step: int, signal_name: str, saved: str | None):
        self.step, self.signal_name, self.saved = step, signal_name, saved
        where = f"checkpoint {saved}" if saved else "no --save-dir, nothing saved"
        super().__init__(f"stopped by {signal_name} after step {step} ({where}); "
                         f"exit status {PREEMPTED_EXIT}, rerun with --resume (or --auto-resume)")


@dataclass
class StopRequest:
    """The signal this rank received (0: none) and the collective check of all ranks."""
    received: int = 0
    _previous: dict = field(default_factory=dict, repr=False)

    @classmethod
    def install(cls, signals=STOP_SIGNALS) -> "StopRequest":
        """Handle `signals` in this process from now on (call once, as the training loop starts)."""
        req = cls()
        for s in signals:
            req._previous[s] = signal.signal(s, req._record)
        return req

    def _record(self, signum, frame) -> None:
        if not self.received:
            self.received = signum

    def uninstall(self) -> None:
        """Restore the handlers that were there before install()."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, device: torch.device | str = "cpu") -> int:
        """Collective: the signal number if any rank received one, else 0. Every rank must call it
        at the same point (after each optimizer step)."""
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)  # [1]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:
            # This rank now saves and exits 75. A launcher that sees a sibling exit first
            # (srun --kill-on-bad-exit, DeepSpeed's launcher) sends SIGTERM; Python restores
            # the default action of handled signals while it shuts down, so only an ignored
            # signal cannot turn the status into "Terminated" (143).
            for s in self._previous:
                signal.signal(s, signal.SIG_IGN)
        return agreed

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
