"""Command line of launch/train.py: argparse -> a validated TrainArgs dataclass."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from megamm.config import LOSS_SCOPES, PRESETS, ConfigError
from megamm.data.blend import parse_blend


@dataclass(frozen=True)
class TrainArgs:
    ds_config: str = "zero3_offload.json"
    model: str = "tiny"
    data: str | tuple[str, ...] | None = None
    """Directory of train*/val* shards; a blend's WEIGHT DIR pairs (megamm.data.blend), as a
    tuple of words; None = the embedded default data set."""
    seq_len: int | None = None
    """Tokens per row; None = the preset's max_seq_len."""
    micro_batch: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int = 10
    max_steps: int = 100
    seed: int = 1234
    save_dir: str | None = None
    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end, when save_dir is set)."""
    keep_last: int = 0
    """Keep only the K newest checkpoints, deleting older ones after a newer one verifies (0: all)."""
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    resume: bool = False
    auto_resume: bool = False
    """Resume when --save-dir has a `latest` checkpoint, else start fresh (batch jobs that may be requeued)."""
    dist_timeout: float = 600.0
    """Seconds a collective waits for a silent rank before the job fails (torch.distributed timeout)."""
    init_from: str | None = None
    """Start from this checkpoint's weights (any layout; fresh optimizer and schedule)."""
    eval_interval: int = 0
    eval_batches: int = 8
    sample_interval: int = 0
    """Every N steps save a checkpoint and write samples from fixed prompts (0: off)."""
    final_eval: bool | None = None
    """Evaluate the final checkpoint (tools/evaluate.py); None: when training on the embedded data set."""
    dry_run: bool = False
    precision: str | None = None
    loss_scope: str | None = None
    z_loss: float | None = None
    activation_checkpointing: bool | None = None
    kernels: str | None = None
    compile: bool = False
    """torch.compile each transformer block (megamm.train.compile); not with kernels="triton"."""
    log_interval: int = 1
    progress: bool = True
    tp: int = 1
    """Tensor-parallel degree; data parallelism is the rest of the world."""
    pp: int = 1
    """Pipeline-parallel degree (needs ZeRO stage 0 or 1)."""
    sequence_parallel: bool = False
    """Keep norms and residuals split along the sequence inside the tp group."""

    def __post_init__(self):
        checks = {"max_steps": self.max_steps >= 1, "warmup": self.warmup >= 0,
                  "save_interval": self.save_interval >= 0, "keep_last": self.keep_last >= 0,
                  "max_bad_steps": self.max_bad_steps >= 1, "eval_interval": self.eval_interval >= 0,
                  "eval_batches": self.eval_batches >= 1,
                  "sample_interval": self.sample_interval >= 0, "log_interval": self.log_interval >= 1,
                  "tp": self.tp >= 1, "pp": self.pp >= 1, "dist_timeout": self.dist_timeout > 0}
        for name in ("seq_len", "micro_batch", "grad_accum"):
            if getattr(self, name) is not None:
                checks[name] = getattr(self, name) >= 1
        if self.lr is not None:
            checks["lr"] = self.lr > 0
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} out of range: {getattr(self, name)}")
        if (self.sample_interval or self.final_eval) and not self.save_dir:
            raise ConfigError("--sample-interval and --final-eval need --save-dir (samples and the "
                              "report are made from its checkpoints)")
        if self.compile and self.kernels == "triton":
            raise ConfigError("--compile cannot trace the hand-written Triton kernels (--kernels triton); use "
                              "--kernels auto or torch: compiled blocks get inductor's own fused kernels")
        if isinstance(self.data, tuple):
            parse_blend(self.data)  # the words' shape and weights; the directories are checked at setup
        if self.resume and not self.save_dir:
            raise ConfigError("--resume needs --save-dir (the directory to resume from)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/train.py",
                                description="Train the unified text/image/audio transformer under DeepSpeed.")
    a = p.add_argument
    a("--ds_config", "--ds-config", dest="ds_config", default="zero3_offload.json",
      help="DeepSpeed JSON; a bare name resolves against ds_configs/")
    a("--model", default="tiny", help=f"preset ({', '.join(PRESETS)}) or a JSON model config file; "
                                      f"the vocabulary comes from the data's meta.json")
    a("--data", default=None, nargs="+", metavar="[WEIGHT] DIR",
      help="directory of train*/val* token shards (default: embedded data set), or a blend of several: "
           "WEIGHT DIR pairs, e.g. 0.7 DIR_A 0.3 DIR_B (packed rows drawn in proportion to the weights)")
    a("--seq-len", type=int)
    a("--micro-batch", type=int, help="overrides train_micro_batch_size_per_gpu")
    a("--grad-accum", type=int, help="overrides gradient_accumulation_steps")
    a("--lr", type=float, help="peak learning rate (overrides the optimizer's lr)")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor as a fraction of --lr")
    a("--warmup", type=int, default=10, help="linear warm-up steps")
    a("--max-steps", type=int, default=100)
    a("--seed", type=int, default=1234)
    a("--save-dir")
    a("--save-interval", type=int, default=0)
    a("--keep-last", type=int, default=0, metavar="K",
      help="keep only the K newest checkpoints; older ones go once a newer one verifies (0: keep all)")
    a("--resume", action="store_true",
      help="continue from the newest intact checkpoint in --save-dir (damaged ones are skipped with a warning)")
    a("--max-bad-steps", type=int, default=10, metavar="N",
      help="stop after N consecutive steps with a non-finite loss or gradient norm (each is skipped)")
    a("--auto-resume", action="store_true",
      help="resume from --save-dir's latest checkpoint when there is one (for requeued batch jobs)")
    a("--dist-timeout", type=float, default=600.0,
      help="seconds a collective waits for a silent rank before the job fails (default 600)")
    a("--init-from", default=None, help="start from this checkpoint's weights (any layout; fresh "
      "optimizer and schedule; --resume of --save-dir takes precedence)")
    a("--eval-interval", type=int, default=0, help="validation loss every N steps (0: off)")
    a("--eval-batches", type=int, default=8)
    a("--sample-interval", type=int, default=0, metavar="N",
      help="every N steps save a checkpoint and write a sample grid and clips from fixed prompts to "
           "<save-dir>/samples/ (0: off)")
    a("--final-eval", dest="final_eval", action="store_const", const=True,
      help="evaluate the final checkpoint into <save-dir>/report.json (default: on for the embedded data set)")
    a("--no-final-eval", dest="final_eval", action="store_const", const=False)
    a("--dry-run", action="store_true", help="build on the meta device, print the size and layout, exit")
    a("--precision", choices=["bf16", "fp16", "fp32"], help="overrides the config's mixed precision")
    a("--loss-scope", choices=list(LOSS_SCOPES),
      help="modality: softmax over the ids the grammar allows (default); full: over every id; target: as "
           "modality, learning only each document's output segment, not its prompt")
    a("--z-loss", type=float)
    a("--activation-checkpointing", dest="activation_checkpointing", action="store_const", const=True)
    a("--no-activation-checkpointing", dest="activation_checkpointing", action="store_const", const=False)
    a("--kernels", choices=["auto", "triton", "torch"])
    a("--compile", action="store_true",
      help="torch.compile each transformer block (inductor, which also generates the norm and RoPE kernels; "
           "the first step pays the compilation)")
    a("--tp", type=int, default=1, help="tensor-parallel degree")
    a("--pp", type=int, default=1, help="pipeline-parallel degree (ZeRO stage 0/1 only)")
    a("--sequence-parallel", action="store_true", help="split norms/residuals along the sequence (tp > 1)")
    a("--log-interval", type=int, default=1)
    a("--no-progress", dest="progress", action="store_false")
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return p


def parse(argv=None) -> TrainArgs:
    ns = vars(parser().parse_args(argv))
    ns.pop("local_rank", None)
    if ns["data"] is not None:  # one directory stays a plain path; a blend keeps its words
        ns["data"] = ns["data"][0] if len(ns["data"]) == 1 else tuple(ns["data"])
    return TrainArgs(**ns)
