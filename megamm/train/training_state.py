"""The whole model's training state, read from a checkpoint of any layout: for every
parameter (plain-model name) its fp32 master weight and Adam moments, whole, plus
Adam's step, the optimizer's hyper-parameters, DeepSpeed's global optimizer state and
its model-state record (lr schedule, step counters, megamm's client state).

Where the pieces lie (files are memory-mapped; one parameter is assembled at a time):

  ZeRO-1/2, also under the pipeline engine and with its bf16 optimizer:
    [bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt for data-parallel rank dp and
    model-parallel rank mp = stage * tp + tp_rank (deepspeed.pipe's grid; mp = tp_rank
    without a pipeline). Each holds one contiguous partition of the flattened parameters
    of each optimizer group; `param_slice_mappings` says where each parameter's fragment
    lies in it, and a parameter's fragments in dp order make its tensor-parallel shard.
    Shapes come from `param_shapes` in mp_rank_<mp>_model_states.pt.
  ZeRO-3: zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt. Every parameter is split into
    dp equal parts (the last one padded); each rank's sub-group buffers, read one after
    another, hold its part of every parameter in the order of `param_shapes` (in
    zero_pp_rank_<dp>_mp_rank_<tp>_model_states.pt).
  universal (a checkpoint tools/reshard.py wrote): megamm/train/universal.py, whole tensors.

Tensor-parallel shards are merged along megamm.parallel.tensor_parallel.shard_dim, and
pipeline names become plain names. ZeRO-0 checkpoints (and imported ones) keep no ZeRO
optimizer partitions: they are refused with a CheckpointError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from megamm.config import ModelConfig
from megamm.parallel.tensor_parallel import shard_dim
from megamm.train import universal
from megamm.train.checkpoint import CheckpointError, read_meta
from megamm.train.safe_load import refusing_unsafe_pickles

STATES = universal.STATES
GLOBAL_KEYS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "ds_version")
# DeepSpeed model-state entries that describe one rank's weights or the source's layout, not the run
_LAYOUT_KEYS = ("module", "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments",
                "buffer_names", "optimizer", "checkpoint_parallel_dimensions")


@dataclass
class TrainingState:
    ckpt: Path
    meta: dict
    config: ModelConfig
    names: list[str]
    """Plain-model names of the trained parameters, in the model's order."""
    step: object
    """Adam's step count, as the optimizer keeps it (an int or a tensor)."""
    param_groups: list[dict]
    global_state: dict
    model_states: dict
    """DeepSpeed's model-state record of rank 0 without weights or layout (lr_scheduler,
    global_steps, ..., and megamm's client state: step, loader, args)."""
    _read: Callable[[str, str], torch.Tensor] = field(repr=False)

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """Whole fp32 tensor `key` (fp32, exp_avg or exp_avg_sq) of parameter `name`."""
        return self._read(name, key)


def open_training_state(ckpt: Path) -> TrainingState:
    """The training state of checkpoint directory `ckpt`; a checkpoint that lacks files its
    megamm.json's layout needs, or holds no optimizer state, is a CheckpointError."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt}: megamm.json records no model config")
    config = ModelConfig.from_dict(meta["model"])
    if universal.is_universal(meta):
        return _universal(ckpt, meta, config)
    stage = int(meta.get("zero_stage", 0))
    if stage == 0:
        raise CheckpointError(f"{ckpt} has no ZeRO optimizer partitions (ZeRO stage 0, or imported weights): "
                              f"nothing to reshard; start a run from its weights with --init-from")
    layout = meta.get("topology", {})
    tp, pp, dp = (int(layout.get(k, 1)) for k in ("tp", "pp", "dp"))
    with refusing_unsafe_pickles(ckpt):
        return (_zero3 if stage == 3 else _zero12)(ckpt, meta, config, tp, pp, dp)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _optim_files(ckpt: Path, n_mp: int, dp: int) -> list[list[Path]]:
    """[mp][dp] -> the ZeRO optimizer file; refuses a missing one or a set that does not
    match the recorded layout."""
    found = sorted(p.name for p in ckpt.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    if len(found) != n_mp * dp:
        raise CheckpointError(f"{ckpt}: {len(found)} ZeRO optimizer files, but the layout in megamm.json "
                              f"needs {n_mp * dp} ({n_mp} model-parallel x {dp} data-parallel ranks)")
    grid = []
    for mp in range(n_mp):
        row = []
        for d in range(dp):
            names = [f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt" for prefix in ("", "bf16_")]
            hit = [ckpt / n for n in names if n in found]
            if not hit:
                raise CheckpointError(f"{ckpt}: missing {names[0]}")
            row.append(hit[0])
        grid.append(row)
    return grid


def _model_record(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k not in _LAYOUT_KEYS}


def _global_state(sd: dict) -> dict:
    osd = sd["optimizer_state_dict"]
    return {k: osd.get(k, sd.get(k)) for k in GLOBAL_KEYS if k in osd or k in sd}


def _merge(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """Tensor-parallel shards of `name` (tp rank order) -> the whole tensor."""
    dim = shard_dim(name)
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim)


def _checked_shape(name: str, flat: torch.Tensor, shape) -> torch.Tensor:
    if flat.numel() != math.prod(shape):
        raise CheckpointError(f"the ZeRO fragments of {name} hold {flat.numel()} values, its shape "
                              f"{list(shape)} needs {math.prod(shape)}")
    return flat.view(shape)


# ---- ZeRO-1/2 ------------------------------------------------------------------------------
def _zero12(ckpt: Path, meta: dict, config: ModelConfig, tp: int, pp: int, dp: int) -> TrainingState:
    n_layers = config.n_layers
    grid = _optim_files(ckpt, tp * pp, dp)
    # (plain name, tp rank) -> [(optimizer state dict, group, start, numel)] in dp order
    pieces: dict[tuple[str, int], list[tuple[dict, int, int, int]]] = {}
    shapes: dict[tuple[str, int], torch.Size] = {}
    order: list[str] = []
    first = None
    for mp, files in enumerate(grid):
        tp_rank = mp % tp
        model_file = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{ckpt}: missing {model_file.name}")
        for group in _load(model_file)["param_shapes"]:
            for name, shape in group.items():
                shapes[(universal.plain_name_of(name, n_layers, pp), tp_rank)] = torch.Size(shape)
        for f in files:
            sd = _load(f)
            first = first or sd
            osd = sd["optimizer_state_dict"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                for name, frag in mapping.items():
                    plain = universal.plain_name_of(name, n_layers, pp)
                    if tp_rank == 0 and (plain, 0) not in pieces:
                        order.append(plain)
                    pieces.setdefault((plain, tp_rank), []).append((osd, g, frag.start, frag.numel))

    def flat(osd: dict, g: int, key: str) -> torch.Tensor:
        if key == "fp32":
            return osd["single_partition_of_fp32_groups"][g]
        return osd["base_optimizer_state"]["state"][g][key]

    def read(name: str, key: str) -> torch.Tensor:
        parts = []
        for r in range(tp):
            if (name, r) not in pieces or (name, r) not in shapes:
                raise CheckpointError(f"{ckpt}: tensor-parallel rank {r} holds no {name}")
            frags = [flat(osd, g, key).narrow(0, start, n) for osd, g, start, n in pieces[(name, r)]]
            parts.append(_checked_shape(name, torch.cat(frags).float(), shapes[(name, r)]))
        return _merge(parts, name)

    base = first["optimizer_state_dict"]["base_optimizer_state"]
    if not base.get("state"):
        raise CheckpointError(f"{ckpt}: the optimizer has no state yet (saved before its first step)")
    record = _load(ckpt / "mp_rank_00_model_states.pt")
    return TrainingState(ckpt=ckpt, meta=meta, config=config, names=order, step=base["state"][0]["step"],
                         param_groups=list(base["param_groups"]), global_state=_global_state(first),
                         model_states=_model_record(record), _read=read)


# ---- ZeRO-3 --------------------------------------------------------------------------------
def _narrow_stream(flats: list[torch.Tensor], offset: int, numel: int) -> torch.Tensor:
    """Values [offset, offset + numel) of the buffers `flats` read one after another."""
    out, at = [], 0
    for t in flats:
        lo, hi = max(offset, at), min(offset + numel, at + t.numel())
        if lo < hi:
            out.append(t.narrow(0, lo - at, hi - lo))
        at += t.numel()
    return torch.cat(out) if len(out) != 1 else out[0]


def _zero3(ckpt: Path, meta: dict, config: ModelConfig, tp: int, pp: int, dp: int) -> TrainingState:
    grid = _optim_files(ckpt, tp, dp)
    records, layouts = [], []  # per tp rank: model-state record; {name: (offset, numel, shape)}
    for r in range(tp):
        model_file = ckpt / f"zero_pp_rank_0_mp_rank_{r:02d}_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{ckpt}: missing {model_file.name}")
        record = _load(model_file)
        records.append(record)
        layout, offset = {}, 0
        for group in record["param_shapes"]:
            for name, shape in group.items():
                numel = math.prod(shape)
                layout[name] = (offset, numel, torch.Size(shape))
                offset += math.ceil(numel / dp)
        layouts.append(layout)
    osds = [[_load(f)["optimizer_state_dict"] for f in files] for files in grid]

    def flats(osd: dict, key: str) -> list[torch.Tensor]:
        if key == "fp32":
            return osd["fp32_flat_groups"]
        state = osd["optimizer_state_dict"]["state"]
        return [state[i][key] for i in range(len(osd["fp32_flat_groups"]))]

    def read(name: str, key: str) -> torch.Tensor:
        parts = []
        for r in range(tp):
            if name not in layouts[r]:
                raise CheckpointError(f"{ckpt}: tensor-parallel rank {r} holds no {name}")
            offset, numel, shape = layouts[r][name]
            size = math.ceil(numel / dp)
            whole = torch.cat([_narrow_stream(flats(osd, key), offset, size) for osd in osds[r]])
            parts.append(_checked_shape(name, whole[:numel].float(), shape))
        return _merge(parts, name)

    inner = osds[0][0]["optimizer_state_dict"]
    if not inner.get("state"):
        raise CheckpointError(f"{ckpt}: the optimizer has no state yet (saved before its first step)")
    first = {"optimizer_state_dict": osds[0][0], **{k: records[0][k] for k in ("ds_version",) if k in records[0]}}
    return TrainingState(ckpt=ckpt, meta=meta, config=config, names=list(layouts[0]), step=inner["state"][0]["step"],
                         param_groups=list(inner["param_groups"]), global_state=_global_state(first),
                         model_states=_model_record(records[0]), _read=read)


# ---- universal -----------------------------------------------------------------------------
def _universal(ckpt: Path, meta: dict, config: ModelConfig) -> TrainingState:
    pp = int(meta.get("topology", {}).get("pp", 1))
    by_plain = {universal.plain_name_of(n, config.n_layers, pp): n for n in universal.param_names(ckpt)}
    if not by_plain:
        raise CheckpointError(f"{ckpt}: no parameters under {universal.ZERO_DIR}/")
    with refusing_unsafe_pickles(ckpt):
        optim = universal.read_optimizer_state(ckpt)
        record = _load(ckpt / universal.MODEL_STATE_FILES[0])
        step = universal.read_step(ckpt, next(iter(by_plain.values())))

    def read(name: str, key: str) -> torch.Tensor:
        if name not in by_plain:
            raise CheckpointError(f"{ckpt}: no {name} under {universal.ZERO_DIR}/")
        return universal.read_state(ckpt, by_plain[name], key)

    from megamm.model import Transformer

    with torch.device("meta"):
        order = [n for n, _ in Transformer(config, device="meta").named_parameters() if n in by_plain]
    return TrainingState(ckpt=ckpt, meta=meta, config=config, names=order, step=step,
                         param_groups=list(optim["param_groups"]),
                         global_state={k: optim[k] for k in GLOBAL_KEYS if k in optim},
                         model_states=_model_record(record), _read=read)
