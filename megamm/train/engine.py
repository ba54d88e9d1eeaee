"""The DeepSpeed engine of a run and one training step as a unit.

Two modes (DeepSpeed refuses ZeRO-2/3 under its pipeline engine):
  pp = 1: the whole model (tensor-parallel shards when tp > 1) under the ZeRO engine,
          ZeRO 0-3 with any offload; the micro-batch loop is ours.
  pp > 1: deepspeed.pipe stages (megamm.parallel.pipeline) under the pipeline engine,
          ZeRO 0-1; `train_batch()` runs the 1F1B schedule.
`Trainer.train_step(batches)` hides which: either way the step optimises the mean
loss over every counted target token of the global batch (all micro-batches, all
data-parallel replicas), so every layout optimises the same objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch

from megamm.checkpoint.ds.pipeline import pipeline_module
from megamm.config import ModelConfig
from megamm.model.loss import N_STATS, GrammarTables
from megamm.parallel.build import build_transformer
from megamm.parallel.distributed import all_reduce_sum
from megamm.parallel.pipeline import pipeline_layers
from megamm.parallel.tensor_parallel import TensorParallel
from megamm.parallel.topology import ParallelGroups, Topology
from megamm.train import ds_config
from megamm.train.bad_steps import BadStepGuard
from megamm.train.compile import apply_compile, compile_config
from megamm.train.init_from import copy_into
from megamm.train.layout import check_layout  # noqa: F401  (the engine's layout check, public here too)
from megamm.vocab import MODALITY_NAMES, Vocab


def _dtype(ds_cfg: dict) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ds_config.precision(ds_cfg)]


@dataclass
class Trainer:
    engine: object
    groups: ParallelGroups
    vocab: Vocab
    device: torch.device
    loss_scope: str
    tables: GrammarTables
    guard: BadStepGuard
    pipeline_loss: object | None = None  # PipelineLoss when pp > 1

    @property
    def topo(self) -> Topology:
        return self.groups.topo

    @property
    def grammar(self) -> bool:
        """Whether the loss counts only grammar-allowed targets (every scope but "full")."""
        return self.loss_scope != "full"

    @property
    def gas(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def _global_count(self, batches) -> float:
        """Counted target tokens of the global batch (every micro-batch of every replica)."""
        allowed = self.tables.get("cpu")[0]
        n = sum(float(self.vocab.counted_targets(self.vocab.states(x), self.vocab.loss_targets(x, y, self.loss_scope),
                                                 self.grammar, allowed).sum())
                for x, y in batches)
        t = torch.tensor([n], dtype=torch.float64, device=self.device)
        return float(all_reduce_sum(t, self.groups.dp_group).cpu())

    def _gather_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Summed statistics (per modality, per source) over data-parallel replicas, known
        on every rank. Only the last stage has statistics, and its tp ranks hold identical
        copies: one counts."""
        mine = self.groups.is_last_stage() and self.groups.tp_rank == 0
        t = (stats if mine else torch.zeros_like(stats)).to(self.device)
        return all_reduce_sum(t).cpu()

    def report_rows(self) -> None:
        """From now on the head also returns each row's loss statistics, which train_step
        sums per source (a blend's `loss_<name>`)."""
        from megamm.model.heads import OutputHead

        for module in self.engine.module.modules():
            if isinstance(module, OutputHead):
                module.row_stats = True

    def _per_source(self, rows: list[torch.Tensor], row_sources, n: int) -> torch.Tensor:
        """[2n]: summed cross-entropy, then counted targets, per source, from each
        micro-batch's row_stats [2, B] and its rows' sources."""
        out = torch.zeros(2, n, dtype=torch.float64)
        for r, src in zip(rows, row_sources):
            out.index_add_(1, torch.as_tensor(src, dtype=torch.int64), r.double())
        return out.reshape(-1)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], step: int = 0,
                   row_sources=None, source_names=None) -> dict:
        """One optimizer step over `gas` micro-batches (inputs, targets) -> its record.
        `step` (from 1) numbers it for the bad-step guard's fault injection. With
        `row_sources` (per micro-batch, each row's index into `source_names`; after
        report_rows) the record has, per source over all replicas, `tokens_<name>`, its
        rows' counted targets, and `loss_<name>`, their token-mean loss (absent for a
        source without counted targets this step)."""
        if len(batches) != self.gas:
            raise ValueError(f"a step takes {self.gas} micro-batches, got {len(batches)}")
        # DeepSpeed divides by gas and averages over data parallel; undo both and divide
        # by the global token count: the gradient is that of the global token mean.
        scale = self.gas * self.topo.dp / max(self._global_count(batches), 1.0)
        if self.pipeline_loss is not None:
            self.pipeline_loss.scale = scale
            self.pipeline_loss.guard = lambda loss: self.guard.loss_for_backward(loss, step)
            self.engine.train_batch(iter([((x, y), y) for x, y in batches]))
            self.pipeline_loss.guard = None
            stats = self.pipeline_loss.take_stats()
            rows = self.pipeline_loss.take_rows()
        else:
            stats, rows = torch.zeros(N_STATS, dtype=torch.float64), []
            for x, y in batches:
                out = self.engine(x.to(self.device), y.to(self.device))
                self.engine.backward(self.guard.loss_for_backward(out.loss_sum * scale, step))
                self.engine.step()
                stats += torch.cat([out.modality_sum, out.modality_count]).double().cpu()
                if out.row_stats is not None:
                    rows.append(out.row_stats.cpu())
        if row_sources is None:
            rec = loss_record(self._gather_stats(stats), "")
        else:
            n = len(source_names)
            # rows only on the last stage; the other ranks add zeros of the same size
            both = self._gather_stats(torch.cat([stats, self._per_source(rows, row_sources, n)]))
            rec = loss_record(both[:N_STATS], "")
            ce, count = both[N_STATS:N_STATS + n], both[N_STATS + n:]
            rec.update({f"tokens_{name}": int(count[k]) for k, name in enumerate(source_names)})
            rec.update({f"loss_{name}": float(ce[k] / count[k]) for k, name in enumerate(source_names) if count[k] > 0})
        rec["lr"] = float(self.engine.get_lr()[0])
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            rec["grad_norm"] = float(gn)
        rec.update(self.guard.after_step(self.engine, step))  # skipped_steps
        return rec

    @torch.no_grad()
    def evaluate(self, batches) -> dict:
        """val_loss* records over this rank's validation micro-batches."""
        self.engine.eval()
        if self.pipeline_loss is not None:
            self.pipeline_loss.take_stats()
            self.engine.eval_batch(iter([((x, y), y) for x, y in batches]), num_micro_batches=len(batches))
            stats = self.pipeline_loss.take_stats()
            self.pipeline_loss.take_rows()  # per-source validation is per split, not per row
        else:
            stats = torch.zeros(N_STATS, dtype=torch.float64)
            for x, y in batches:
                out = self.engine(x.to(self.device), y.to(self.device))
                stats += torch.cat([out.modality_sum, out.modality_count]).double().cpu()
        self.engine.train()
        return loss_record(self._gather_stats(stats), "val_")


def loss_record(stats: torch.Tensor, prefix: str) -> dict:
    """Token-mean losses (overall and per modality) from summed statistics [N_STATS]."""
    m = len(MODALITY_NAMES)
    rec = {f"{prefix}loss": float(stats[:m].sum() / stats[m:].sum().clamp(min=1))}
    for i, name in enumerate(MODALITY_NAMES):
        if stats[m + i] > 0:
            rec[f"{prefix}loss_{name}"] = float(stats[i] / stats[m + i])
    return rec


def build_trainer(cfg: ModelConfig, ds_cfg: dict, groups: ParallelGroups, device: torch.device, seed: int,
                  sequence_parallel: bool = False, lr_lambda=None, guard: BadStepGuard | None = None,
                  init_state: dict | None = None, compile: bool = False) -> Trainer:
    """The engine for this rank's part of the model under `ds_cfg`; `init_state` (the
    whole plain model's weights, megamm.train.init_from) replaces the initial weights;
    `compile` compiles each block (megamm.train.compile) before the engine wraps it."""
    topo = groups.topo
    tp = (TensorParallel(groups.tp_group, groups.tp_rank, topo.tp, sequence_parallel)
          if topo.tp > 1 else None)
    scheduler = None
    if "scheduler" not in ds_cfg and lr_lambda is not None:
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)  # noqa: E731
    pipeline_loss = None
    build_cfg = compile_config(cfg) if compile else cfg  # apply_compile adds the checkpointing
    if topo.pp > 1:
        specs, sizes, pipeline_loss = pipeline_layers(build_cfg, tp, device, seed)
        model = pipeline_module(specs, sizes, pipeline_loss, topo)
        if init_state is not None:
            copy_into(model, init_state, groups.tp_rank, topo.tp)
        if compile:
            apply_compile(model, cfg.activation_checkpointing)
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg, lr_scheduler=scheduler,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
    else:
        zero3 = ds_config.zero_stage(ds_cfg) == 3
        # ZeRO-3: built on the host in the training precision (never whole on the
        # accelerator), then partitioned over data parallel as zero.Init would while building
        model = (build_transformer(build_cfg, "cpu", seed, tp, dtype=_dtype(ds_cfg)) if zero3
                 else build_transformer(build_cfg, device, seed, tp))
        if init_state is not None:
            copy_into(model, init_state, groups.tp_rank, topo.tp)
        if zero3:
            deepspeed.zero.Init(module=model, config_dict_or_path=ds_cfg, data_parallel_group=groups.dp_group)
        if compile:
            apply_compile(model, cfg.activation_checkpointing, zero3=zero3)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg,
                                               mpu=groups, lr_scheduler=scheduler)
    vocab = Vocab(cfg.vocab)
    return Trainer(engine=engine, groups=groups, vocab=vocab, device=device, loss_scope=cfg.loss_scope,
                   tables=GrammarTables(vocab), guard=guard or BadStepGuard(), pipeline_loss=pipeline_loss)
