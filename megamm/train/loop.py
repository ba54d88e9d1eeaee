"""The training run behind `deepspeed launch/train.py`: set up (process groups, data,
engine, resume), then step, evaluate, checkpoint and log until max_steps.

    run(args) = setup(args) -> Run;  while ...: Run.trainer.train_step(batches) -> record
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megamm.config import ModelConfig, get_preset
from megamm.data.loader import PackedLoader, open_split, validation_batches
from megamm.parallel import Topology
from megamm.parallel.distributed import barrier, init_distributed
from megamm.tokenizers import tokenizers_dir_of
from megamm.schedule import warmup_cosine
from megamm.train import bad_steps, checkpoint, ds_config, universal
from megamm.train.args import TrainArgs
from megamm.train.engine import Trainer, build_trainer, check_layout
from megamm.train.init_from import load_init_state
from megamm.train.metrics import MetricsLog, flops_per_token, peak_flops
from megamm.train.preemption import Preempted, StopRequest
from megamm.vocab import Vocab


def model_config(args: TrainArgs, ds_cfg: dict) -> ModelConfig:
    """The preset with the command line's model overrides applied."""
    cfg = get_preset(args.model)
    changes = {}
    if args.seq_len is not None:
        changes["max_seq_len"] = args.seq_len
    if args.loss_scope is not None:
        changes["loss_scope"] = args.loss_scope
    if args.z_loss is not None:
        changes["z_loss"] = args.z_loss
    if args.kernels is not None:
        changes["kernels"] = args.kernels
    ac = args.activation_checkpointing
    if ac is None and "activation_checkpointing" in ds_cfg:
        ac = True  # the ds_config asks for activation checkpointing
    if ac is not None:
        changes["activation_checkpointing"] = ac
    return cfg.replace(**changes)


def describe(cfg: ModelConfig, ds_cfg: dict, topo: Topology, args: TrainArgs) -> str:
    counts = cfg.parameter_counts()
    n, tp, pp = counts["total"], topo.tp, topo.pp
    mb, gas = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    per_rank = n // (tp * pp)  # stages are balanced by parameters
    lines = [
        f"parameters: {n:,}",
        f"model: {args.model}  layers={cfg.n_layers} d_model={cfg.d_model} heads={cfg.n_heads} "
        f"kv_heads={cfg.n_kv_heads} ffn={cfg.ffn_dim} seq_len={cfg.max_seq_len} vocab={cfg.vocab.padded_size:,} "
        f"(text {cfg.vocab.text_size:,}, image {cfg.vocab.image_codes:,}x{cfg.vocab.image_tokens}/img, "
        f"audio {cfg.vocab.audio_codebooks}x{cfg.vocab.audio_codebook_size})",
        f"  embedding {counts['embedding']:,}  blocks {counts['blocks']:,}  head {counts['head']:,}",
        f"layout: {topo.describe()}  zero_stage={ds_config.zero_stage(ds_cfg)} "
        f"offload={ds_config.offload(ds_cfg)} precision={ds_config.precision(ds_cfg)} "
        f"activation_checkpointing={cfg.activation_checkpointing}"
        + (" sequence_parallel=True" if args.sequence_parallel else ""),
        f"  per rank: ~{per_rank:,} parameters "
        f"({'1/' + str(tp) + ' of every layer' if tp > 1 else 'whole layers'}"
        f"{', ' + str(cfg.n_layers + 3) + ' pipeline layers over ' + str(pp) + ' stages' if pp > 1 else ''})",
        f"batch: micro {mb} x accum {gas} x dp {topo.dp} = {mb * gas * topo.dp} rows of {cfg.max_seq_len} tokens",
    ]
    return "\n".join(lines)


def lr_lambda(args: TrainArgs):
    """Linear warm-up to 1, cosine decay to min_lr_ratio at max_steps."""
    return lambda step: warmup_cosine(step, args.max_steps, args.warmup, args.min_lr_ratio)


def resolve_data_dir(args: TrainArgs, rank: int) -> Path:
    if args.data is not None:
        return Path(args.data)
    from megamm.demo.recipe import ensure_default_dataset

    if rank == 0:  # builds (once, cached) while the other ranks wait, then finds it cached
        ensure_default_dataset()
    barrier()
    return ensure_default_dataset()


@dataclass
class Run:
    """Everything a training run holds between steps."""

    args: TrainArgs
    cfg: ModelConfig
    ds_cfg: dict
    trainer: Trainer
    loader: PackedLoader
    val: list | None
    data_dir: Path
    rank: int
    step: int = 0

    @property
    def topo(self) -> Topology:
        return self.trainer.topo

    def meta(self) -> dict:
        """What megamm.json records next to the engine's files."""
        tok = tokenizers_dir_of(self.data_dir)
        return {"model": self.cfg.to_dict(), "preset": self.args.model, "data": str(self.data_dir),
                "tokenizers": str(tok) if tok else None,
                "zero_stage": ds_config.zero_stage(self.ds_cfg), "precision": ds_config.precision(self.ds_cfg),
                "topology": {"tp": self.topo.tp, "pp": self.topo.pp, "dp": self.topo.dp},
                "sequence_parallel": self.args.sequence_parallel}

    def save(self) -> None:
        checkpoint.save(self.trainer.engine, self.args.save_dir, self.step,
                        {"step": self.step, "loader": self.loader.state_dict(),
                         "args": dataclasses.asdict(self.args)},
                        self.meta(), self.rank, keep_last=self.args.keep_last)


def load_configs(args: TrainArgs) -> tuple[ModelConfig, dict]:
    ds_cfg = ds_config.apply_overrides(ds_config.load(args.ds_config), micro_batch=args.micro_batch,
                                       grad_accum=args.grad_accum, lr=args.lr, precision=args.precision)
    ds_cfg = bad_steps.prepare_config(ds_cfg)  # DeepSpeed skips steps with non-finite gradients
    return model_config(args, ds_cfg), ds_cfg


def setup(args: TrainArgs, cfg: ModelConfig, ds_cfg: dict) -> Run:
    """Process groups, data, engine and (with --resume) the checkpoint's state."""
    device = init_distributed(args.dist_timeout)
    import torch.distributed as dist

    rank = dist.get_rank()
    topo = Topology.for_world(dist.get_world_size(), args.tp, args.pp)
    check_layout(cfg, ds_cfg, topo, args.sequence_parallel)
    groups = topo.build_groups()
    vocab = Vocab(cfg.vocab)
    data_dir = resolve_data_dir(args, rank)
    mb = ds_cfg["train_micro_batch_size_per_gpu"]
    # every tp rank and pipeline stage of a data-parallel replica reads the same rows
    loader = PackedLoader(open_split(data_dir, "train", vocab), vocab, cfg.max_seq_len, mb,
                          groups.dp_rank, topo.dp, seed=args.seed)
    val = None
    if args.eval_interval:
        val = validation_batches(open_split(data_dir, "val", vocab), vocab, cfg.max_seq_len, mb,
                                 groups.dp_rank, topo.dp, args.eval_batches)
    init_state = load_init_state(args.init_from, cfg) if args.init_from and not args.resume else None
    tag = None
    if args.resume or (args.auto_resume and checkpoint.has_latest(args.save_dir)):
        tag = checkpoint.pick_for_resume(args.save_dir, rank)
        meta = checkpoint.read_meta(Path(args.save_dir) / tag)
        if universal.is_universal(meta):  # resharded: DeepSpeed loads it when the engine is built for it
            ds_cfg = universal.resume_config(meta, topo.tp, topo.pp, ds_cfg, Path(args.save_dir) / tag)
    trainer = build_trainer(cfg, ds_cfg, groups, device, args.seed, args.sequence_parallel, lr_lambda(args),
                            guard=bad_steps.BadStepGuard.from_env(args.max_bad_steps, rank), init_state=init_state)
    del init_state
    run = Run(args=args, cfg=cfg, ds_cfg=ds_cfg, trainer=trainer, loader=loader, val=val,
              data_dir=data_dir, rank=rank)
    if rank == 0:
        print(describe(cfg, ds_cfg, topo, args), flush=True)
        print(f"data: {data_dir} ({sum(len(s) for s in loader.shards):,} train documents, "
              f"{loader.steps_per_epoch() // trainer.gas:,} steps per epoch)", flush=True)
    if tag is not None:
        client = checkpoint.resume(trainer.engine, args.save_dir, rank, tag)
        run.step = int(client["step"])
        loader.load_state_dict(client["loader"])
        if rank == 0:
            print(f"resumed from {args.save_dir} at step {run.step}", flush=True)
    return run


def run(args: TrainArgs) -> list[dict]:
    """Train; returns the per-step metric records (rank 0; others return [])."""
    cfg, ds_cfg = load_configs(args)
    if args.dry_run:
        world = int(os.environ.get("WORLD_SIZE", args.tp * args.pp))
        topo = Topology.for_world(world, args.tp, args.pp)
        check_layout(cfg, ds_cfg, topo, args.sequence_parallel)
        print(describe(cfg, ds_cfg, topo, args), flush=True)
        return []
    r = setup(args, cfg, ds_cfg)
    trainer, rank = r.trainer, r.rank
    log = MetricsLog(Path(args.save_dir) / "metrics.jsonl" if args.save_dir and rank == 0 else None)
    tokens_per_step = r.loader.micro_batch * trainer.gas * r.topo.dp * cfg.max_seq_len
    flops_tok = flops_per_token(cfg, cfg.max_seq_len)
    peak = peak_flops(trainer.device)
    bar = None
    if rank == 0 and args.progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_steps, initial=r.step, desc="train", dynamic_ncols=True)
    stop = StopRequest.install()  # from here SIGTERM/SIGUSR1 -> all ranks save after the same step
    records = []
    while r.step < args.max_steps:
        t0 = time.perf_counter()
        rec = trainer.train_step([r.loader.next_batch() for _ in range(trainer.gas)], r.step + 1)
        r.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": r.step, **rec, "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
        if peak:
            rec["mfu"] = flops_tok * tokens_per_step / dt / (peak * r.topo.world_size)
            rec["mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        if r.val is not None and r.step % args.eval_interval == 0:
            rec.update(trainer.evaluate(r.val))
        if rank == 0:
            records.append(rec)
            monitor_events(trainer.engine, rec)
            if r.step % args.log_interval == 0 or r.step == args.max_steps:
                log.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        trainer.guard.stop_if_exhausted()  # every rank saw the same skips
        signum = stop.agreed(trainer.device) if r.step < args.max_steps else 0  # collective: any rank signalled?
        sample_now = bool(args.sample_interval and r.step % args.sample_interval == 0)
        if args.save_dir and trainer.guard.may_save() and ((args.save_interval and r.step % args.save_interval == 0)
                                                           or r.step == args.max_steps or signum or sample_now):
            r.save()
            if sample_now and rank == 0:
                from megamm.demo.report import write_samples

                write_samples(Path(args.save_dir) / f"step{r.step}", Path(args.save_dir) / "samples", r.step)
        if signum:
            e = Preempted(r.step, StopRequest.name(signum),
                          args.save_dir and str(Path(args.save_dir) / f"step{r.step}"))
            if rank == 0:
                print(f"preempted: {e}", flush=True)
            raise e
    if bar is not None:
        bar.close()
    if rank == 0 and records:
        last = records[-1]
        print(f"done: step {last['step']} loss {last['loss']:.4f}"
              + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""), flush=True)
    final_eval = args.final_eval if args.final_eval is not None else (args.data is None and bool(args.save_dir))
    if final_eval and rank == 0 and checkpoint.has_latest(args.save_dir):
        final_report(Path(args.save_dir))
    return records


def monitor_events(engine, rec: dict) -> None:
    """Hand the step's record to DeepSpeed's monitors (the config's tensorboard / csv_monitor /
    wandb sections), when any is enabled."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    monitor.write_events([(f"Train/megamm/{k}", float(v), rec["step"]) for k, v in rec.items()
                          if k != "step" and isinstance(v, (int, float))])


class FinalEvalError(RuntimeError):
    """The run trained and saved, but evaluating its final checkpoint failed."""


def final_report(save_dir: Path) -> None:
    """tools/evaluate.py on the run's final checkpoint; prints where the report and samples are."""
    out = save_dir / "report.json"
    print(f"evaluating the final checkpoint ({save_dir / checkpoint.latest_tag(save_dir)}) ...", flush=True)
    try:
        from megamm.demo.report import evaluate

        report = evaluate(save_dir, out, log=lambda m: print(m, flush=True))
    except Exception as e:  # noqa: BLE001 - the checkpoint is safe; say so in one line
        raise FinalEvalError(f"evaluating the final checkpoint failed ({type(e).__name__}: {e}); the checkpoint "
                             f"is saved: python tools/evaluate.py --checkpoint {save_dir} --out {out}") from None
    keys = ("test_nll_nats_per_dim", "text_to_image_digit_acc", "text_to_image_color_acc", "image_to_text_exact",
            "audio_to_text_exact", "text_to_audio_word_acc")
    print("report: " + ", ".join(f"{k} {report[k]:.3f}" for k in keys if k in report), flush=True)
    print(f"samples: {report['samples_png']}" + (f"  curve: {report['curve_png']}" if "curve_png" in report else ""),
          flush=True)
    print(f"report written to {out}", flush=True)
