"""One-rank DeepSpeed engine driven through megamm's fault hooks; prints one JSON object.

    python tests/faults/engine_probe.py DATA_DIR WORK_DIR DS_CONFIG

1. Bad steps: a clean step, then an injected-NaN step and a step whose loss is +inf
   (both through BadStepGuard.loss_for_backward), then a clean step. Reports whether
   DeepSpeed applied each step and whether fp32 master weights, bf16 weights, Adam
   moments, Adam's step count and the learning rate changed across it.
2. Untrusted files: saves a checkpoint, replaces its model-states file by a pickle that
   would create WORK_DIR/marker when loaded, rewrites the manifest to match (so only
   the unpickler stands in the way) and resumes from it through checkpoint.resume.
Run by tests/faults/test_faults.py in its own process (it initialises torch.distributed).
"""
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class CreatesMarker:
    """Unpickling this calls open(marker, "w"): the file appears only if the code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        out[f"fp32:{name}"] = safe_get_full_fp32_param(p).clone()
        out[f"bf16:{name}"] = p.detach().float().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}:{name}"] = safe_get_full_optimizer_state(p, key).clone()
    for i, state in enumerate(engine.optimizer.optimizer.state.values()):
        out[f"adam_step:{i}"] = torch.as_tensor(state["step"], dtype=torch.float64).clone()
    out["lr"] = torch.tensor(engine.get_lr()[0], dtype=torch.float64)
    return out


def changed(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def main(data_dir: str, work: str, config: str) -> dict:
    from megamm.parallel.distributed import init_distributed

    device = init_distributed()
    from megamm.config import ConfigError, get_preset
    from megamm.data.loader import PackedLoader, open_split
    from megamm.checkpoint.ds import hooks
    from megamm.train import bad_steps, checkpoint, ds_config
    from megamm.train.args import TrainArgs
    from megamm.parallel import Topology
    from megamm.train.engine import build_trainer
    from megamm.train.loop import lr_lambda
    from megamm.vocab import Vocab

    args = TrainArgs(ds_config=config, seq_len=128, micro_batch=2, lr=5e-3, warmup=2)
    ds_cfg = hooks.enable_step_skip(ds_config.apply_overrides(ds_config.load(config), micro_batch=2, grad_accum=1,
                                                                lr=args.lr))
    cfg = get_preset("tiny").replace(max_seq_len=128)
    vocab = Vocab(cfg.vocab)
    loader = PackedLoader(open_split(data_dir, "train", vocab), vocab, 128, 2, seed=1)
    engine = build_trainer(cfg, ds_cfg, Topology().build_groups(), device, args.seed, lr_lambda=lr_lambda(args)).engine
    guard = bad_steps.BadStepGuard(max_bad=3, fault_steps=frozenset({2}))
    report = {"steps": []}
    before = None  # Adam's state exists from the first applied step on
    for step, scale in ((1, 1.0), (2, 1.0), (3, float("inf")), (4, 1.0)):
        x, y = loader.next_batch()
        out = engine(x, y)
        engine.backward(guard.loss_for_backward(out.loss * scale, step))
        engine.step()
        rec = guard.after_step(engine, step)
        after = snapshot(engine)
        report["steps"].append({"step": step, "applied": engine.was_step_applied(), **rec,
                                "consecutive": guard.consecutive,
                                "changed": changed(before, after) if before else None,
                                "n_state": len(after)})
        before = after

    save_dir = Path(work) / "ckpt"
    client = {"step": 4, "loader": loader.state_dict()}
    ckpt = checkpoint.save(engine, save_dir, 4, client, {"model": cfg.to_dict(), "zero_stage": 2}, rank=0)
    marker = Path(work) / "marker"
    states = ckpt / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=True)
    sd["loader"] = CreatesMarker(marker)
    torch.save(sd, states)
    from megamm.checkpoint import manifest

    manifest.write(ckpt, manifest.entries(ckpt, manifest.list_files(ckpt)))
    try:
        checkpoint.resume(engine, save_dir, rank=0)
        report["resume"] = "loaded"
    except ConfigError as e:  # CheckpointError, UnsafeCheckpointError
        report["resume"] = f"{type(e).__name__}: {e}"
    report["marker_exists"] = marker.exists()
    return report


if __name__ == "__main__":
    print("PROBE " + json.dumps(main(*sys.argv[1:4])), flush=True)
