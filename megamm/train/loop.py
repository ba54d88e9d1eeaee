"""The training run behind `deepspeed launch/train.py`: set up (process groups, data,
engine, resume), then step until max_steps, asking each periodic job (megamm.train
.schedules) after every step whether this step is its own.

    run(args, hooks) = setup(args) -> Run;  while step < max_steps: trainer.train_step -> jobs

`Hooks` are what the entry point plugs in (the default data set, samples, the final
evaluation), so the train package imports neither megamm.eval nor the demo.

Data: one directory (PackedLoader), or a blend of several (`--data 0.7 DIR_A 0.3 DIR_B`,
megamm.data.blend's BlendedLoader; they must share one vocabulary). A blend's sources are
named by their directories' basenames, and its metrics.jsonl records add `tokens_<name>`
(counted target tokens from that source, all replicas) and `loss_<name>` (the token-mean
training loss of that source's rows) every step and, at validation,
`val_loss_<name>` per source's validation split, with `val_loss` their weight-mean.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from megamm.checkpoint import has_latest, latest_tag, read_meta
from megamm.checkpoint.ds import universal
from megamm.config import ConfigError, ModelConfig, resolve_model
from megamm.data.blend import BlendedLoader, Source, check_shared_vocab, resolve_sources
from megamm.data.loader import PackedLoader, data_vocab, open_split, validation_batches
from megamm.parallel import Topology
from megamm.parallel.distributed import barrier, init_distributed
from megamm.schedule import warmup_cosine
from megamm.tokenizers import tokenizers_dir_of
from megamm.train import bad_steps, checkpoint, ds_config
from megamm.train.args import TrainArgs
from megamm.train.engine import Trainer, build_trainer, check_layout
from megamm.train.init_from import load_init_state
from megamm.train.metrics import MetricsLog, flops_per_token, peak_flops
from megamm.train.preemption import Preempted, StopRequest
from megamm.train.schedules import Checkpointer, MetricsLogger, Sampler, Validator
from megamm.vocab import Vocab


def model_config(args: TrainArgs, ds_cfg: dict) -> ModelConfig:
    """The preset (or JSON model config) of --model with the command line's model
    overrides applied. Its vocabulary is replaced by the data's in `with_data_vocab`."""
    cfg = resolve_model(args.model)
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


def with_data_vocab(cfg: ModelConfig, data_dir: Path) -> ModelConfig:
    """`cfg` with the unified vocabulary the data was prepared for (its meta.json, derived
    from its tokenizers), padded to cfg's pad_multiple: the shape comes from --model, the
    vocabulary from the data. Unchanged when the data records no vocabulary."""
    vocab = data_vocab(data_dir, cfg.vocab.pad_multiple)
    if vocab is None or vocab.layout_difference(cfg.vocab, "") is None:
        return cfg
    return cfg.replace(vocab=vocab)


def check_resumed_vocab(meta: dict, cfg: ModelConfig, ckpt: Path, data_dir: Path) -> None:
    """Refuse, in one line, to resume a checkpoint trained on another vocabulary than the data's."""
    try:
        saved = ModelConfig.from_dict(meta["model"]).vocab
    except (KeyError, TypeError, ConfigError):
        return  # an old or foreign megamm.json: the engine's shape check has the last word
    diff = saved.layout_difference(cfg.vocab, "data")
    if diff:
        raise ConfigError(f"cannot resume {ckpt}: it was trained on another vocabulary than {data_dir} "
                          f"was prepared for ({diff})")


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
        + (" sequence_parallel=True" if args.sequence_parallel else "") + (" compile=True" if args.compile else ""),
        f"  per rank: ~{per_rank:,} parameters "
        f"({'1/' + str(tp) + ' of every layer' if tp > 1 else 'whole layers'}"
        f"{', ' + str(cfg.n_layers + 3) + ' pipeline layers over ' + str(pp) + ' stages' if pp > 1 else ''})",
        f"batch: micro {mb} x accum {gas} x dp {topo.dp} = {mb * gas * topo.dp} rows of {cfg.max_seq_len} tokens",
    ]
    return "\n".join(lines)


def lr_lambda(args: TrainArgs):
    """Linear warm-up to 1, cosine decay to min_lr_ratio at max_steps."""
    return lambda step: warmup_cosine(step, args.max_steps, args.warmup, args.min_lr_ratio)


@dataclass(frozen=True)
class Hooks:
    """What the entry point (launch/train.py) plugs into a run."""

    default_data: Callable[[], Path] | None = None
    """The data directory when --data is not given; called on rank 0 first (it may build and
    cache it), then on the other ranks."""
    sample: Callable[[torch.nn.Module, Path | None, Path, int], object] | None = None
    """sample(plain model, tokenizers dir, out dir, step), on rank 0 every --sample-interval steps."""
    final_eval: Callable[[Path], None] | None = None
    """final_eval(save dir) on rank 0 after the last save, when the run evaluates at the end
    (--final-eval, or by default on the default data set); its failure is a FinalEvalError."""


def resolve_data(args: TrainArgs, rank: int, hooks: Hooks) -> list[Source]:
    """The run's data sources: a blend's (each directory checked), else one directory's."""
    if isinstance(args.data, tuple):
        return resolve_sources(args.data)
    path = resolve_data_dir(args, rank, hooks)
    return [Source(path.name, 1.0, path)]


def data_and_vocab(args: TrainArgs, cfg: ModelConfig, rank: int, hooks: Hooks) -> tuple[list[Source], ModelConfig]:
    """The run's data sources (sharing one vocabulary, else one-line refusal) and `cfg`
    with the first source's vocabulary."""
    sources = resolve_data(args, rank, hooks)
    check_shared_vocab(sources, cfg.vocab.pad_multiple)
    return sources, with_data_vocab(cfg, sources[0].path)


def resolve_data_dir(args: TrainArgs, rank: int, hooks: Hooks) -> Path:
    if args.data is not None:
        return Path(args.data)
    if hooks.default_data is None:
        raise ConfigError("no --data given, and this entry point has no default data set")
    if rank == 0:  # builds (once, cached) while the other ranks wait, then finds it cached
        hooks.default_data()
    barrier()
    return hooks.default_data()


@dataclass
class Run:
    """Everything a training run holds between steps."""

    args: TrainArgs
    cfg: ModelConfig
    ds_cfg: dict
    trainer: Trainer
    loader: PackedLoader | BlendedLoader
    val: list | dict[str, list] | None
    """Validation micro-batches; a blend's by source name."""
    data_dir: Path
    """The data directory (a blend's first source: its vocabulary and tokenizers are the run's)."""
    rank: int
    sources: list[Source] = dataclasses.field(default_factory=list)
    step: int = 0

    @property
    def blended(self) -> bool:
        return isinstance(self.loader, BlendedLoader)

    @property
    def topo(self) -> Topology:
        return self.trainer.topo

    def meta(self) -> dict:
        """What megamm.json records next to the engine's files."""
        tok = tokenizers_dir_of(self.data_dir)
        data = " ".join(self.args.data) if self.blended else str(self.data_dir)
        return {"model": self.cfg.to_dict(), "preset": self.args.model, "data": data,
                "tokenizers": str(tok) if tok else None,
                "zero_stage": ds_config.zero_stage(self.ds_cfg), "precision": ds_config.precision(self.ds_cfg),
                "topology": {"tp": self.topo.tp, "pp": self.topo.pp, "dp": self.topo.dp},
                "sequence_parallel": self.args.sequence_parallel}

    def client_state(self) -> dict:
        """What megamm adds to DeepSpeed's state in a checkpoint (the loader's position travels)."""
        return {"step": self.step, "loader": self.loader.state_dict(), "args": dataclasses.asdict(self.args)}


def load_configs(args: TrainArgs) -> tuple[ModelConfig, dict]:
    ds_cfg = ds_config.apply_overrides(ds_config.load(args.ds_config), micro_batch=args.micro_batch,
                                       grad_accum=args.grad_accum, lr=args.lr, precision=args.precision)
    ds_cfg = bad_steps.prepare_config(ds_cfg)  # DeepSpeed skips steps with non-finite gradients
    return model_config(args, ds_cfg), ds_cfg


def setup(args: TrainArgs, cfg: ModelConfig, ds_cfg: dict, hooks: Hooks = Hooks()) -> Run:
    """Process groups, data, engine and (with --resume) the checkpoint's state."""
    device = init_distributed(args.dist_timeout)
    rank = dist.get_rank()
    topo = Topology.for_world(dist.get_world_size(), args.tp, args.pp)
    check_layout(cfg, ds_cfg, topo, args.sequence_parallel)
    sources, cfg = data_and_vocab(args, cfg, rank, hooks)
    data_dir = sources[0].path
    check_layout(cfg, ds_cfg, topo, args.sequence_parallel)  # again: the vocabulary may have grown
    groups = topo.build_groups()
    vocab = Vocab(cfg.vocab)
    tag = None
    if args.resume or (args.auto_resume and has_latest(args.save_dir)):
        tag = checkpoint.pick_for_resume(args.save_dir, rank)
        meta = read_meta(Path(args.save_dir) / tag)
        check_resumed_vocab(meta, cfg, Path(args.save_dir) / tag, data_dir)
        if universal.is_universal(meta):  # resharded: DeepSpeed loads it when the engine is built for it
            ds_cfg = universal.resume_config(meta, topo.tp, topo.pp, ds_cfg, Path(args.save_dir) / tag)
    mb = ds_cfg["train_micro_batch_size_per_gpu"]
    # every tp rank and pipeline stage of a data-parallel replica reads the same rows
    if len(sources) == 1:
        loader = PackedLoader(open_split(data_dir, "train", vocab), vocab, cfg.max_seq_len, mb,
                              groups.dp_rank, topo.dp, seed=args.seed)
    else:  # each source's plans through a PackedLoader of its own; the blend deals the rows out
        loader = BlendedLoader([PackedLoader(open_split(s.path, "train", vocab), vocab, cfg.max_seq_len, 1,
                                             seed=args.seed) for s in sources],
                               [s.name for s in sources], [s.weight for s in sources], mb, groups.dp_rank, topo.dp)
    val = None
    if args.eval_interval:
        val = {s.name: validation_batches(open_split(s.path, "val", vocab), vocab, cfg.max_seq_len, mb,
                                          groups.dp_rank, topo.dp, args.eval_batches) for s in sources}
        val = val if len(sources) > 1 else val[sources[0].name]
    init_state = load_init_state(args.init_from, cfg) if args.init_from and not args.resume else None
    trainer = build_trainer(cfg, ds_cfg, groups, device, args.seed, args.sequence_parallel, lr_lambda(args),
                            guard=bad_steps.BadStepGuard.from_env(args.max_bad_steps, rank), init_state=init_state,
                            compile=args.compile)
    del init_state
    run = Run(args=args, cfg=cfg, ds_cfg=ds_cfg, trainer=trainer, loader=loader, val=val,
              data_dir=data_dir, rank=rank, sources=sources)
    if rank == 0:
        print(describe(cfg, ds_cfg, topo, args), flush=True)
        if run.blended:
            for s, src in zip(sources, loader.sources):
                print(f"data: {s.weight:g} x {s.path} as {s.name} ({sum(len(r) for r in src.shards):,} train "
                      f"documents, {src.n_rows:,} rows per epoch)", flush=True)
        else:
            print(f"data: {data_dir} ({sum(len(s) for s in loader.shards):,} train documents, "
                  f"{loader.steps_per_epoch() // trainer.gas:,} steps per epoch)", flush=True)
    if tag is not None:
        client = checkpoint.resume(trainer.engine, args.save_dir, rank, tag)
        run.step = int(client["step"])
        loader.load_state_dict(client["loader"])
        if rank == 0:
            print(f"resumed from {args.save_dir} at step {run.step}", flush=True)
    return run


def run(args: TrainArgs, hooks: Hooks = Hooks()) -> list[dict]:
    """Train; returns the per-step metric records (rank 0; others return [])."""
    cfg, ds_cfg = load_configs(args)
    if args.dry_run:
        if args.data is not None:
            cfg = data_and_vocab(args, cfg, 0, hooks)[1]
        world = int(os.environ.get("WORLD_SIZE", args.tp * args.pp))
        topo = Topology.for_world(world, args.tp, args.pp)
        check_layout(cfg, ds_cfg, topo, args.sequence_parallel)
        print(describe(cfg, ds_cfg, topo, args), flush=True)
        return []
    r = setup(args, cfg, ds_cfg, hooks)
    trainer, rank, cfg = r.trainer, r.rank, r.cfg
    save_dir = Path(args.save_dir) if args.save_dir else None
    validator = Validator(args.eval_interval, r.val)
    logger = MetricsLogger(MetricsLog(save_dir / "metrics.jsonl" if save_dir and rank == 0 else None),
                           args.log_interval, args.max_steps, trainer.engine,
                           bar=tqdm(total=args.max_steps, initial=r.step, desc="train", dynamic_ncols=True)
                           if rank == 0 and args.progress else None)
    checkpointer = Checkpointer(save_dir, args.save_interval, args.max_steps, args.keep_last, trainer.guard.may_save)
    sampler = Sampler(args.sample_interval, hooks.sample, tokenizers_dir_of(r.data_dir),
                      save_dir / "samples" if save_dir else None)
    tokens_per_step = r.loader.micro_batch * trainer.gas * r.topo.dp * cfg.max_seq_len
    flops_tok = flops_per_token(cfg, cfg.max_seq_len)
    peak = peak_flops(trainer.device)
    stop = StopRequest.install()  # from here SIGTERM/SIGUSR1 -> all ranks save after the same step
    names = [s.name for s in r.sources] if r.blended else None
    if r.blended:
        trainer.report_rows()  # the head's per-row loss statistics -> tokens_ and loss_<name> per source
    while r.step < args.max_steps:
        t0 = time.perf_counter()
        batches, row_sources = [], []
        for _ in range(trainer.gas):
            batches.append(r.loader.next_batch())
            row_sources.append(getattr(r.loader, "last_sources", None))
        rec = trainer.train_step(batches, r.step + 1, row_sources if r.blended else None, names)
        r.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": r.step, **rec, "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
        if peak:
            rec["mfu"] = flops_tok * tokens_per_step / dt / (peak * r.topo.world_size)
            rec["mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        if validator.should_validate(r.step):
            rec.update(validate(r, trainer, validator.batches))
        if rank == 0:
            logger.record(rec)
        trainer.guard.stop_if_exhausted()  # every rank saw the same skips
        signum = stop.agreed(trainer.device) if r.step < args.max_steps else 0  # collective: any rank signalled?
        if checkpointer.should_save(r.step, bool(signum)):
            checkpointer.save(trainer.engine, r.step, r.client_state(), r.meta(), rank)
        if sampler.should_sample(r.step):
            sampler.run(trainer, cfg, r.step, rank)
        if signum:
            e = Preempted(r.step, StopRequest.name(signum), save_dir and str(save_dir / f"step{r.step}"))
            if rank == 0:
                print(f"preempted: {e}", flush=True)
            raise e
    if logger.bar is not None:
        logger.bar.close()
    if rank == 0 and logger.records:
        last = logger.records[-1]
        print(f"done: step {last['step']} loss {last['loss']:.4f}"
              + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""), flush=True)
    final_eval = args.final_eval if args.final_eval is not None else (args.data is None and bool(save_dir))
    if final_eval and rank == 0 and has_latest(save_dir) and hooks.final_eval is not None:
        final_report(save_dir, hooks.final_eval)
    return logger.records


def validate(r: Run, trainer: Trainer, batches) -> dict:
    """val_loss* of the validation batches; a blend's val_loss_<name> per source, and
    val_loss their mean weighted by the blend's weights."""
    if not r.blended:
        return trainer.evaluate(batches)
    per = {s.name: trainer.evaluate(batches[s.name])["val_loss"] for s in r.sources}
    total = sum(s.weight for s in r.sources)
    return {"val_loss": sum(s.weight * per[s.name] for s in r.sources) / total,
            **{f"val_loss_{name}": loss for name, loss in per.items()}}


class FinalEvalError(RuntimeError):
    """The run trained and saved, but evaluating its final checkpoint failed."""


def final_report(save_dir: Path, evaluate: Callable[[Path], None]) -> None:
    """The final evaluation hook on the run's checkpoint; any failure becomes one line that
    says the checkpoint is safe and how to evaluate it again."""
    print(f"evaluating the final checkpoint ({save_dir / latest_tag(save_dir)}) ...", flush=True)
    try:
        evaluate(save_dir)
    except Exception as e:  # noqa: BLE001 - the checkpoint is safe; say so in one line
        raise FinalEvalError(f"evaluating the final checkpoint failed ({type(e).__name__}: {e}); the checkpoint "
                             f"is saved: python tools/evaluate.py --checkpoint {save_dir} "
                             f"--out {save_dir / 'report.json'}") from None
