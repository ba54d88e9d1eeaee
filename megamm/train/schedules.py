"""The periodic jobs of a training run, each owning its schedule (torchtitan's
`validator.should_validate(step)` / `checkpointer.save(step)` style), so the loop only
asks each one after every optimizer step:

    Validator      should_validate(step): every --eval-interval steps     -> val_loss* records
    MetricsLogger  log(record): every --log-interval steps and the last   -> metrics.jsonl, monitors, bar
    Checkpointer   should_save(step, signalled): every --save-interval steps, the last step and a
                   stop signal, never right after a skipped step           -> step<N>/ (atomic)
    Sampler        should_sample(step): every --sample-interval steps      -> hooks.sample(model, ...)
    (BadStepGuard.stop_if_exhausted, megamm.train.bad_steps, after every step)

Steps count from 1 (the metrics' "step"). Every rank calls every `should_*` with the same
step and gets the same answer, so the collectives behind a job line up.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megamm.checkpoint.ds import hooks
from megamm.config import ModelConfig
from megamm.model import Transformer
from megamm.parallel.tensor_parallel import merge_shard
from megamm.train import checkpoint
from megamm.train.metrics import MetricsLog


def _every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


@dataclass
class Validator:
    interval: int
    batches: list | None

    def should_validate(self, step: int) -> bool:
        return self.batches is not None and _every(self.interval, step)


@dataclass
class MetricsLogger:
    """Rank 0's records: kept in memory, appended to metrics.jsonl every `interval` steps and
    at `last_step`, handed to DeepSpeed's monitors and shown on the progress bar."""
    log: MetricsLog
    interval: int
    last_step: int
    engine: object
    bar: object | None = None
    records: list = field(default_factory=list)

    def should_log(self, step: int) -> bool:
        return _every(self.interval, step) or step == self.last_step

    def record(self, rec: dict) -> None:
        self.records.append(rec)
        monitor_events(self.engine, rec)
        if self.should_log(rec["step"]):
            self.log.write(rec)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")


def monitor_events(engine, rec: dict) -> None:
    """Hand the step's record to DeepSpeed's monitors (the config's tensorboard / csv_monitor /
    wandb sections), when any is enabled."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    monitor.write_events([(f"Train/megamm/{k}", float(v), rec["step"]) for k, v in rec.items()
                          if k != "step" and isinstance(v, (int, float))])


@dataclass
class Checkpointer:
    save_dir: Path | None
    interval: int
    last_step: int
    keep_last: int
    may_save: Callable[[], bool]
    """False right after a skipped step (the bad-step guard): the last good checkpoint stays."""

    def should_save(self, step: int, signalled: bool) -> bool:
        return (self.save_dir is not None and self.may_save()
                and (_every(self.interval, step) or step == self.last_step or signalled))

    def save(self, engine, step: int, client_state: dict, meta: dict, rank: int) -> Path:
        return checkpoint.save(engine, self.save_dir, step, client_state, meta, rank, keep_last=self.keep_last)


@dataclass
class Sampler:
    """Samples from the live weights every `interval` steps, through the entry point's hook
    `sample(model, tokenizers_dir, out_dir, step)`; no checkpoint is written for it."""
    interval: int
    sample: Callable | None
    tokenizers: Path | None
    out_dir: Path | None

    def should_sample(self, step: int) -> bool:
        return self.sample is not None and self.out_dir is not None and _every(self.interval, step)

    def run(self, trainer, cfg: ModelConfig, step: int, rank: int) -> None:
        """A collective: every rank contributes its weights; rank 0 samples. A sample that
        fails is one warning line on rank 0: training goes on."""
        model = live_plain_model(trainer, cfg)
        if rank == 0:
            try:
                self.sample(model, self.tokenizers, self.out_dir, step)
            except Exception as e:  # noqa: BLE001 - samples are a side job; the run and its checkpoints go on
                print(f"warning: samples at step {step} failed ({type(e).__name__}: {e})", file=sys.stderr,
                      flush=True)
        if dist.is_initialized():
            dist.barrier()


def live_plain_model(trainer, cfg: ModelConfig) -> Transformer | None:
    """The live fp32 master weights of every rank, as one plain model on rank 0's CPU in eval
    mode (None on the other ranks). A collective: every rank calls it. Rank 0 holds one fp32
    copy of the whole model, so it suits the presets a CPU or one GPU can sample from."""
    groups = trainer.groups
    mine = hooks.live_fp32_weights(trainer.engine)  # this rank's tp shard of its stage's parameters
    shards = [(groups.tp_rank, mine if groups.dp_rank == 0 else {})]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(shards[0], gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        shards = gathered
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for tp_rank, sd in shards:
        for name, t in sd.items():
            parts.setdefault(name, {})[tp_rank] = t
    state = {name: merge_shard(name, [by_rank[r] for r in sorted(by_rank)]) for name, by_rank in parts.items()}
    plain = cfg.replace(activation_checkpointing=False)
    with torch.device("meta"):
        model = Transformer(plain, device="meta")
    model.to_empty(device="cpu")
    if plain.tie_embeddings:
        state.setdefault("head.weight", state["embed.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the live weights do not fit the model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
    return model.eval()
