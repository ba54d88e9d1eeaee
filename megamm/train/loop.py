"""The training run behind `deepspeed launch/train.py`: build, (resume,) train, evaluate,
checkpoint, log. One function per stage; `run(args)` strings them together."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from megamm.config import ModelConfig, get_preset
from megamm.data.loader import PackedLoader, open_split, validation_batches
from megamm.model import Transformer
from megamm.parallel import Topology
from megamm.train import bad_steps, checkpoint, ds_config
from megamm.train.args import TrainArgs
from megamm.train.metrics import MetricsLog, flops_per_token, peak_flops
from megamm.vocab import MODALITY_NAMES, Vocab


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


def count_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Parameters of the model built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg, tp=tp, device="meta")
    return sum(p.numel() for p in model.parameters())


def describe(cfg: ModelConfig, ds_cfg: dict, topo: Topology, args: TrainArgs) -> str:
    n = count_parameters(cfg, topo.tp)
    v = Vocab(cfg.vocab, tp=topo.tp)
    emb = v.size * cfg.d_model
    lines = [
        f"parameters: {n:,}",
        f"model: {args.model}  layers={cfg.n_layers} d_model={cfg.d_model} heads={cfg.n_heads} "
        f"kv_heads={cfg.n_kv_heads} ffn={cfg.ffn_dim} seq_len={cfg.max_seq_len} vocab={v.size:,} "
        f"(text {cfg.vocab.text_size:,}, image {cfg.vocab.image_codes:,}x{cfg.vocab.image_tokens}/img, "
        f"audio {cfg.vocab.audio_codebooks}x{cfg.vocab.audio_codebook_size})",
        f"  embedding {emb:,}  blocks {n - emb * (1 if cfg.tie_embeddings else 2):,}  "
        f"head {0 if cfg.tie_embeddings else emb:,}",
        f"layout: {topo.describe()}  zero_stage={ds_config.zero_stage(ds_cfg)} "
        f"offload={ds_config.offload(ds_cfg)} precision={ds_config.precision(ds_cfg)} "
        f"activation_checkpointing={cfg.activation_checkpointing}",
        f"batch: micro {ds_cfg['train_micro_batch_size_per_gpu']} x accum "
        f"{ds_cfg['gradient_accumulation_steps']} x dp {topo.dp} = "
        f"{ds_cfg['train_micro_batch_size_per_gpu'] * ds_cfg['gradient_accumulation_steps'] * topo.dp} rows "
        f"of {cfg.max_seq_len} tokens",
    ]
    return "\n".join(lines)


def lr_lambda(args: TrainArgs):
    """Linear warm-up to 1, cosine decay to min_lr_ratio at max_steps."""
    def f(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return f


def resolve_data_dir(args: TrainArgs, rank: int) -> Path:
    if args.data is not None:
        return Path(args.data)
    from megamm.data.default import ensure_default_dataset

    if rank == 0:  # builds (once, cached) while the other ranks wait, then finds it cached
        ensure_default_dataset()
    _barrier()
    return ensure_default_dataset()


def tokenizers_of(data_dir: Path) -> str | None:
    """Absolute path of the tokenizers a data directory was prepared with (its meta.json)."""
    try:
        tok = json.loads((Path(data_dir) / "meta.json").read_text()).get("tokenizers")
    except (OSError, json.JSONDecodeError):
        return None
    return str((Path(data_dir) / tok).resolve()) if tok else None


def _single_process_env() -> None:
    """`python launch/train.py` without a launcher: one rank on this machine."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def build_engine(cfg: ModelConfig, ds_cfg: dict, args: TrainArgs, device: torch.device):
    import deepspeed

    torch.manual_seed(args.seed)
    if ds_config.zero_stage(ds_cfg) == 3:  # partition while building: 8B never sits whole anywhere
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
            model = Transformer(cfg, device=device)
    else:
        model = Transformer(cfg, device=device)
    scheduler = None
    if "scheduler" not in ds_cfg:
        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=ds_cfg, lr_scheduler=scheduler)
    return engine, sched


def _modality_stats(out) -> torch.Tensor:
    """[2M] float64 on CPU: per-modality summed cross-entropy, then per-modality counts."""
    return torch.cat([out.modality_sum.double().cpu(), out.modality_count.double().cpu()])


def _loss_record(stats: torch.Tensor, prefix: str) -> dict:
    """Token-mean losses (overall and per modality) from summed _modality_stats."""
    m = len(MODALITY_NAMES)
    rec = {f"{prefix}loss": float(stats[:m].sum() / stats[m:].sum().clamp(min=1))}
    for i, name in enumerate(MODALITY_NAMES):
        if stats[m + i] > 0:
            rec[f"{prefix}loss_{name}"] = float(stats[i] / stats[m + i])
    return rec


def evaluate(engine, batches, device) -> dict:
    engine.eval()
    stats = torch.zeros(2 * len(MODALITY_NAMES), dtype=torch.float64)
    with torch.no_grad():
        for inputs, targets in batches:
            stats += _modality_stats(engine(inputs.to(device), targets.to(device)))
    engine.train()
    return _loss_record(_all_reduce_sum(stats.to(device)).cpu(), "val_")


def run(args: TrainArgs) -> list[dict]:
    """Train; returns the per-step metric records (rank 0; others return [])."""
    ds_cfg = ds_config.apply_overrides(ds_config.load(args.ds_config), micro_batch=args.micro_batch,
                                       grad_accum=args.grad_accum, lr=args.lr, precision=args.precision)
    ds_cfg = bad_steps.prepare_config(ds_cfg)  # [issue 12] DeepSpeed's non-finite-gradient skip on
    cfg = model_config(args, ds_cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    topo = Topology.for_world(world)
    if args.dry_run:
        print(describe(cfg, ds_cfg, topo, args), flush=True)
        return []

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    acc = get_accelerator()
    backend = acc.communication_backend_name()
    if backend == "ccl":  # the CPU accelerator prefers oneCCL; gloo is what a CPU wheel has
        backend = "gloo"
    _single_process_env()
    deepspeed.init_distributed(dist_backend=backend)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    guard = bad_steps.BadStepGuard.from_env(args.max_bad_steps, rank)  # [issue 12]
    topo = Topology.for_world(world)
    device = torch.device(acc.device_name(acc.current_device()))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one machine share its cores; oversubscribed threads crawl
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    vocab = Vocab(cfg.vocab, tp=topo.tp)

    data_dir = resolve_data_dir(args, rank)
    train_shards = open_split(data_dir, "train", vocab)
    mb, gas = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    loader = PackedLoader(train_shards, vocab, cfg.max_seq_len, mb, rank, topo.dp, seed=args.seed)
    val = None
    if args.eval_interval:
        val = validation_batches(open_split(data_dir, "val", vocab), vocab, cfg.max_seq_len, mb,
                                 rank, topo.dp, args.eval_batches)

    engine, _ = build_engine(cfg, ds_cfg, args, device)
    if rank == 0:
        print(describe(cfg, ds_cfg, topo, args), flush=True)
        print(f"data: {data_dir} ({sum(len(s) for s in train_shards):,} train documents, "
              f"{loader.steps_per_epoch() // gas:,} steps per epoch)", flush=True)

    step = 0
    if args.resume:
        client = checkpoint.resume(engine, args.save_dir, rank)
        step = int(client["step"])
        loader.load_state_dict(client["loader"])
        if rank == 0:
            print(f"resumed from {args.save_dir} at step {step}", flush=True)

    meta = {"model": cfg.to_dict(), "preset": args.model, "data": str(data_dir),
            "tokenizers": tokenizers_of(data_dir),
            "zero_stage": ds_config.zero_stage(ds_cfg), "precision": ds_config.precision(ds_cfg),
            "topology": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp}}
    log = MetricsLog(Path(args.save_dir) / "metrics.jsonl" if args.save_dir and rank == 0 else None)
    tokens_per_step = mb * gas * topo.dp * cfg.max_seq_len
    flops_tok = flops_per_token(cfg, cfg.max_seq_len, vocab.size)
    peak = peak_flops(device)
    bar = None
    if rank == 0 and args.progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_steps, initial=step, desc="train", dynamic_ncols=True)

    records = []
    grammar, table = cfg.loss_scope == "modality", vocab.column_table()
    while step < args.max_steps:
        t0 = time.perf_counter()
        batches = [loader.next_batch() for _ in range(gas)]
        # Every layout must optimise the same objective: the mean loss over all counted
        # target tokens of the global batch. A micro-batch's mean is rescaled by its share
        # of the tokens; DeepSpeed then divides by gas and averages over data parallel.
        counts = torch.tensor([float(vocab.counted_targets(vocab.states(x), y, grammar, table).sum())
                               for x, y in batches], dtype=torch.float64)
        global_count = float(_all_reduce_sum(counts.sum().view(1).to(device)).cpu())
        stats = torch.zeros(2 * len(MODALITY_NAMES), dtype=torch.float64)
        for (inputs, targets), n in zip(batches, counts.tolist()):
            out = engine(inputs.to(device), targets.to(device))
            engine.backward(guard.loss_for_backward(out.loss * (n * gas * topo.dp / max(global_count, 1.0)),
                                                    step + 1))  # [issue 12] non-finite -> NaN grads -> skipped
            engine.step()
            stats += _modality_stats(out)
        step += 1
        stats = _all_reduce_sum(stats.to(device)).cpu()
        dt = time.perf_counter() - t0
        rec = {"step": step, **_loss_record(stats, ""), "lr": float(engine.get_lr()[0]),
               "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
        rec.update(guard.after_step(engine, step))  # [issue 12] {"skipped_steps": n}
        gn = engine.get_global_grad_norm()
        if gn is not None:
            rec["grad_norm"] = float(gn)
        if peak:
            rec["mfu"] = flops_tok * tokens_per_step / dt / (peak * topo.world_size)
            rec["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if val is not None and step % args.eval_interval == 0:
            rec.update(evaluate(engine, val, device))
        if rank == 0:
            records.append(rec)
            if step % args.log_interval == 0 or step == args.max_steps:
                log.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        guard.stop_if_exhausted()  # [issue 12] BadStepsError after --max-bad-steps skipped in a row
        if args.save_dir and guard.may_save() and (  # [issue 12] no checkpoint after a skipped step
                (args.save_interval and step % args.save_interval == 0) or step == args.max_steps):
            checkpoint.save(engine, args.save_dir, step,
                            {"step": step, "loader": loader.state_dict(), "args": dataclasses.asdict(args)},
                            meta, rank, keep_last=args.keep_last)  # [issue 12] keep_last
    if bar is not None:
        bar.close()
    if rank == 0 and records:
        last = records[-1]
        print(f"done: step {last['step']} loss {last['loss']:.4f}"
              + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""), flush=True)
    return records
