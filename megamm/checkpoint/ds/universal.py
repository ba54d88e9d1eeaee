"""DeepSpeed's universal checkpoint layout: what tools/reshard.py writes and
`launch/train.py --resume` loads under another tensor/pipeline/data-parallel layout.

A universal checkpoint holds every parameter whole, and DeepSpeed cuts it for the
loading run (its tensor-parallel slice, then its ZeRO partition):

    <step dir>/zero/<name>/fp32.pt        {"param": whole fp32 tensor, "cat_dim": d}
    <step dir>/zero/<name>/exp_avg.pt     the same for Adam's first moment
    <step dir>/zero/<name>/exp_avg_sq.pt  ... and its second moment
    <step dir>/zero/<name>/step.pt        Adam's step count
    <step dir>/zero/optimizer_state.pt    hyper-parameters, loss scaler, gradient clipping
    <step dir>/mp_rank_00_model_states.pt and zero_pp_rank_0_mp_rank_00_model_states.pt
                                          (the name ZeRO-3 reads): no weights; the lr schedule,
                                          DeepSpeed's step counters and megamm's client state
    <step dir>/megamm.json                "format": "universal"; "topology": the layout it is for

`<name>` is the engine's parameter name, which is the plain model's under every layout
(pipeline stages keep plain names; universal checkpoints written before they did carry
"<layer>.<key>" names under a pipeline: megamm.checkpoint.ds.read maps those when
reading, and `resume_config` refuses to resume one). `cat_dim` is the dimension megamm's tensor parallelism
splits (megamm.parallel.tensor_parallel.shard_dim); a replicated parameter records 0,
and since its whole shape is every rank's shape DeepSpeed does not cut it. So the files
serve any tensor-parallel degree, and ZeRO partitions them over any data-parallel size.

Resuming (`resume_config`) sets `"checkpoint": {"load_universal": true}` before the
engine is built. DeepSpeed then takes the weights from zero/ alone (never a model file)
and loads them into its ZeRO optimizer, so stage 0 cannot load one; under ZeRO-3 it cuts
tensor-parallel slices only for its own AutoTP layers, so ZeRO-3 resumes one with tp = 1.
The run's --tp/--pp must be the ones recorded in megamm.json (the names above and the
layout the RNG files were written for).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from megamm.config import ConfigError

FORMAT = "universal"
ZERO_DIR = "zero"
OPTIMIZER_FILE = "optimizer_state.pt"
STATES = ("fp32", "exp_avg", "exp_avg_sq")  # the per-parameter tensors, DeepSpeed's file names
MODEL_STATE_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
PARAM, CAT_DIM = "param", "cat_dim"  # deepspeed.checkpoint.constants PARAM, CAT_DIM
_LEGACY_NAME = re.compile(r"\d+\..+")  # "<pipeline layer>.<key>": written before stages kept plain names


def is_universal(meta: dict) -> bool:
    return meta.get("format") == FORMAT


# ---- writing -------------------------------------------------------------------------------
def write_param(step_dir: Path, name: str, tensors: dict[str, torch.Tensor], cat_dim: int, step) -> None:
    """The four files of one parameter: tensors = {state: whole fp32 tensor} for STATES."""
    d = Path(step_dir) / ZERO_DIR / name
    d.mkdir(parents=True, exist_ok=True)
    for key in STATES:
        torch.save({PARAM: tensors[key].detach().float().contiguous(), CAT_DIM: cat_dim}, d / f"{key}.pt")
    torch.save(step, d / "step.pt")


def write_optimizer_state(step_dir: Path, global_state: dict, param_groups: list[dict], step) -> None:
    """zero/optimizer_state.pt in the shape both of DeepSpeed's universal loaders read:
    ZeRO-1/2 and its bf16 optimizer (global state + "param_groups") and ZeRO-3
    ("optimizer_state_dict" with the step and the groups)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in param_groups]
    state = {**global_state, "param_groups": groups,
             "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}}
    d = Path(step_dir) / ZERO_DIR
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / OPTIMIZER_FILE)


# ---- reading (a universal checkpoint resharded again, or loaded as a plain model) ----------
def read_state(step_dir: Path, name: str, key: str) -> torch.Tensor:
    """The whole fp32 tensor `key` (one of STATES) of parameter `name`."""
    return torch.load(Path(step_dir) / ZERO_DIR / name / f"{key}.pt", map_location="cpu",
                      weights_only=True)[PARAM].float()


def read_step(step_dir: Path, name: str):
    return torch.load(Path(step_dir) / ZERO_DIR / name / "step.pt", weights_only=True)


def read_optimizer_state(step_dir: Path) -> dict:
    return torch.load(Path(step_dir) / ZERO_DIR / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def param_names(step_dir: Path) -> list[str]:
    """Engine names of the parameters a universal checkpoint holds, sorted."""
    zero = Path(step_dir) / ZERO_DIR
    return sorted(p.parent.name for p in zero.glob("*/fp32.pt"))


# ---- resuming ------------------------------------------------------------------------------
def resume_config(meta: dict, tp: int, pp: int, ds_cfg: dict, ckpt: Path) -> dict:
    """The DeepSpeed config that loads universal checkpoint `ckpt` (its megamm.json is
    `meta`) in a run with `tp`, `pp`; a layout or ZeRO stage it cannot load is refused."""
    if any(_LEGACY_NAME.fullmatch(n) for n in param_names(ckpt)):
        raise ConfigError(f"{ckpt} was resharded before pipeline stages kept the plain model's parameter names; "
                          f"run tools/reshard.py on it again to resume it")
    stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    layout = meta.get("topology", {})
    if (layout.get("tp"), layout.get("pp")) != (tp, pp):
        raise ConfigError(f"{ckpt} was resharded for --tp {layout.get('tp')} --pp {layout.get('pp')}, this run "
                          f"has --tp {tp} --pp {pp}: pass those, or reshard it again with tools/reshard.py")
    if stage == 0:
        raise ConfigError(f"{ckpt} is a resharded (universal) checkpoint, which DeepSpeed loads only into a "
                          f"ZeRO optimizer: use a config with zero_optimization.stage 1-3")
    if stage == 3 and tp > 1:
        raise ConfigError(f"{ckpt} is a resharded (universal) checkpoint: DeepSpeed's ZeRO-3 loads one only with "
                          f"--tp 1; use ZeRO-1/2 (e.g. --ds_config zero1.json) for --tp {tp}")
    cfg = copy.deepcopy(ds_cfg)
    cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
    return cfg
