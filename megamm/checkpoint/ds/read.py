"""The one reader of DeepSpeed's checkpoint files: `read(ckpt)` -> CheckpointState, the
whole model's state under plain-model names, for every layout megamm trains.

    state.names                 plain-model names of the stored parameters, model order
    state.layout                Layout(tp, pp, dp, zero_stage, universal)
    state.weight(name)          the fp32 master weight where the layout keeps one, else the
                                16-bit module weight; whole (tensor-parallel shards merged)
    state.tensor(name, key)     key in STATES: fp32 master, exp_avg, exp_avg_sq (ZeRO 1-3
                                and universal only; CheckpointError otherwise)
    state.module_weight(name)   the module's own (16-bit under bf16) weight, where stored
    state.step, .param_groups, .global_state, .model_states   Adam's step, its
                                hyper-parameters, DeepSpeed's global optimizer state and
                                model-state record (lr schedule, counters, client state)

Where the pieces lie (files are memory-mapped; one parameter is assembled at a time):

  ZeRO-1/2 (also under the pipeline engine, and DeepSpeed's bf16 optimizer, whose files
    carry a "bf16_" prefix): [bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt for
    data-parallel rank dp and model-parallel rank mp = stage * tp + tp_rank (the grid of
    deepspeed.pipe; mp = tp_rank without a pipeline). Each holds one contiguous partition
    of each optimizer group's flattened parameters; `param_slice_mappings` says where each
    parameter's fragment lies, and the fragments in dp order make its tp shard. Shapes:
    `param_shapes` in mp_rank_<mp>_model_states.pt.
  ZeRO-3: zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt. Every parameter is split into dp
    equal parts (the last padded); each rank's sub-group buffers, read one after another,
    hold its part of every parameter in the order of `param_shapes` (in
    zero_pp_rank_<dp>_mp_rank_<tp>_model_states.pt).
    Under NVMe offload those buffers are empty placeholders and the values sit in
    offloaded_tensors/rank<global rank>/<id>.tensor.swp (fp32 masters),
    exp_avg-<id>.tensor.swp and exp_avg_sq-<id>.tensor.swp: raw fp32, one file per
    sub-group (ordered by the first number of <id>), padded at the end.
  ZeRO-0: no partitions; the module weights of mp_rank_<tp>_model_states.pt ("module").
  Module weights under a pipeline: layer_<LL>-model_<tp>-model_states.pt, one file per
    pipeline layer (megamm.model.transformer.stage_paths order) whose keys are the stage's own
    ("<attribute>.<rest>"), i.e. "<plain path of layer LL>.<rest>" in the plain model.
  universal (tools/reshard.py): megamm.checkpoint.ds.universal, whole tensors.

Parameter names inside DeepSpeed's files are the engine's, which are the plain model's
for every layout. Checkpoints written before pipeline stages kept plain names carry
"<layer>.<attribute>.<rest>" names under a pipeline; `plain_name_of` maps them, so they
read like any other.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from megamm.checkpoint.ds import universal
from megamm.checkpoint.ds.safe_load import refusing_unsafe_pickles
from megamm.checkpoint.layout import CheckpointError, read_meta
from megamm.config import ModelConfig
from megamm.model import Transformer
from megamm.model.transformer import stage_paths
from megamm.parallel.topology import Topology
from megamm.parallel.tensor_parallel import merge_shard

STATES = universal.STATES
GLOBAL_KEYS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "ds_version")
# DeepSpeed model-state entries that describe one rank's weights or the source's layout, not the run
_LAYOUT_KEYS = ("module", "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments",
                "buffer_names", "optimizer", "checkpoint_parallel_dimensions")
_LEGACY_PIPELINE_NAME = re.compile(r"(\d+)\.([^.]+)\.(.+)")  # "<layer>.<attribute>.<rest>"


def model_file(mp: int) -> str:
    """The model-state file of model-parallel rank mp (ZeRO 0-2, pipelines)."""
    return f"mp_rank_{mp:02d}_model_states.pt"


def zero3_model_file(tp_rank: int) -> str:
    return f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"


def optim_file(dp_rank: int, mp: int, bf16: bool = False) -> str:
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"


def layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def write_module_weights(step_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """A checkpoint's weights as DeepSpeed's ZeRO-0, tp = 1 model file (what `read` takes
    for a layout with no optimizer state: tools/convert_from_hf.py writes one)."""
    torch.save({"module": state_dict}, Path(step_dir) / model_file(0))


def plain_name_of(name: str, n_layers: int) -> str:
    """A parameter name from DeepSpeed's files -> its plain-model name (the identity, except
    for a pipeline checkpoint written before stages kept plain names)."""
    m = _LEGACY_PIPELINE_NAME.fullmatch(name)
    if m is None:
        return name
    return f"{stage_paths(n_layers)[int(m.group(1))]}.{m.group(3)}"


def has_legacy_names(names) -> bool:
    """Whether names (from DeepSpeed's files) are pipeline names of the old "<layer>." form."""
    return any(_LEGACY_PIPELINE_NAME.fullmatch(n) for n in names)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    universal: bool


@dataclass
class CheckpointState:
    ckpt: Path
    meta: dict
    config: ModelConfig
    layout: Layout
    names: list[str]
    """Plain-model names of the stored parameters, in the model's order."""
    step: object
    """Adam's step count, as the optimizer keeps it (an int or a tensor); None without one."""
    param_groups: list[dict]
    global_state: dict
    model_states: dict
    """DeepSpeed's model-state record of rank 0 without weights or layout (lr_scheduler,
    global_steps, ..., and megamm's client state: step, loader, args)."""
    _read: Callable[[str, str], torch.Tensor] | None = field(repr=False)
    _module: Callable[[str], torch.Tensor] | None = field(repr=False)

    @property
    def has_optimizer_state(self) -> bool:
        return self._read is not None

    def require_optimizer_state(self) -> None:
        """CheckpointError unless the layout keeps fp32 master weights and Adam moments."""
        if self._read is None:
            raise CheckpointError(f"{self.ckpt} has no ZeRO optimizer partitions (ZeRO stage 0, or imported "
                                  f"weights): nothing to reshard; start a run from its weights with --init-from")

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """Whole fp32 tensor `key` (one of STATES) of parameter `name`."""
        self.require_optimizer_state()
        return self._read(name, key)

    def module_weight(self, name: str) -> torch.Tensor:
        """The module's own weight of `name`, whole, in the dtype it was saved in."""
        if self._module is None:
            raise CheckpointError(f"{self.ckpt}: this layout keeps no module weights of its own")
        return self._module(name)

    def weight(self, name: str) -> torch.Tensor:
        """The fp32 master weight where the layout keeps one, else the module weight."""
        return self.tensor(name, "fp32") if self._read is not None else self._module(name)


def read(ckpt) -> CheckpointState:
    """The state of checkpoint directory `ckpt`; one that lacks files its megamm.json's
    layout needs is a CheckpointError. Loading runs under refusing_unsafe_pickles."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt}: megamm.json records no model config")
    config = ModelConfig.from_dict(meta["model"])
    topo = meta.get("topology", {})
    layout = Layout(*(int(topo.get(k, 1)) for k in ("tp", "pp", "dp")), int(meta.get("zero_stage", 0)),
                    universal.is_universal(meta))
    with refusing_unsafe_pickles(ckpt):
        if layout.universal:
            return _universal(ckpt, meta, config, layout)
        if layout.zero_stage == 3:
            return _zero3(ckpt, meta, config, layout)
        if layout.zero_stage in (1, 2) or any(ckpt.glob(optim_file(0, 0, bf16=True))):
            return _zero12(ckpt, meta, config, layout)  # (ZeRO-0 under bf16 keeps the same partitions)
        return _zero0(ckpt, meta, config, layout)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: missing {path.name}")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _model_order(config: ModelConfig, names) -> list[str]:
    with torch.device("meta"):
        return [n for n, _ in Transformer(config, device="meta").named_parameters() if n in set(names)]


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
            hit = [ckpt / n for n in (optim_file(d, mp), optim_file(d, mp, bf16=True)) if n in found]
            if not hit:
                raise CheckpointError(f"{ckpt}: missing {optim_file(d, mp)}")
            row.append(hit[0])
        grid.append(row)
    return grid


def _model_record(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k not in _LAYOUT_KEYS}


def _global_state(sd: dict) -> dict:
    osd = sd["optimizer_state_dict"]
    return {k: osd.get(k, sd.get(k)) for k in GLOBAL_KEYS if k in osd or k in sd}


def _checked_shape(name: str, flat: torch.Tensor, shape) -> torch.Tensor:
    if flat.numel() != math.prod(shape):
        raise CheckpointError(f"the ZeRO fragments of {name} hold {flat.numel()} values, its shape "
                              f"{list(shape)} needs {math.prod(shape)}")
    return flat.view(shape)


def _module_reader(ckpt: Path, config: ModelConfig, layout: Layout):
    """(name -> whole module weight, the names stored), from the pipeline's layer files
    (pp > 1) or the model files' "module" (pp = 1, where DeepSpeed stores one); None
    where neither exists."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(layout.tp)]
    if layout.pp > 1:
        paths = stage_paths(config.n_layers)
        for layer, path in enumerate(paths):
            for r in range(layout.tp):
                f = ckpt / layer_file(layer, r)
                if not f.is_file() and layout.tp == 1:
                    f = ckpt / f"layer_{layer:02d}-model_states.pt"  # DeepSpeed's name without tp
                for key, t in _load(f).items():
                    shards[r][f"{path}.{key.split('.', 1)[1]}"] = t
    else:
        for r in range(layout.tp):
            f = ckpt / model_file(r)
            module = _load(f).get("module") if f.is_file() else None
            if not module:
                return None
            shards[r] = module

    def read_module(name: str) -> torch.Tensor:
        if name not in shards[0]:
            raise CheckpointError(f"{ckpt}: no module weight {name}")
        return merge_shard(name, [s[name] for s in shards])
    return read_module, list(shards[0])


# ---- ZeRO-0 --------------------------------------------------------------------------------
def _zero0(ckpt: Path, meta: dict, config: ModelConfig, layout: Layout) -> CheckpointState:
    found = _module_reader(ckpt, config, layout)
    if found is None:
        raise CheckpointError(f"{ckpt}: no module weights in {model_file(0)}")
    module, stored = found
    return CheckpointState(ckpt=ckpt, meta=meta, config=config, layout=layout,
                           names=_model_order(config, stored), step=None, param_groups=[], global_state={},
                           model_states=_model_record(_load(ckpt / model_file(0))), _read=None, _module=module)


# ---- ZeRO-1/2 ------------------------------------------------------------------------------
def _zero12(ckpt: Path, meta: dict, config: ModelConfig, layout: Layout) -> CheckpointState:
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    grid = _optim_files(ckpt, tp * pp, dp)
    # (plain name, tp rank) -> [(optimizer state dict, group, start, numel)] in dp order
    pieces: dict[tuple[str, int], list[tuple[dict, int, int, int]]] = {}
    shapes: dict[tuple[str, int], torch.Size] = {}
    first = None
    for mp, files in enumerate(grid):
        tp_rank = mp % tp
        for group in _load(ckpt / model_file(mp))["param_shapes"]:
            for name, shape in group.items():
                shapes[(plain_name_of(name, config.n_layers), tp_rank)] = torch.Size(shape)
        for f in files:
            sd = _load(f)
            first = first or sd
            osd = sd["optimizer_state_dict"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                for name, frag in mapping.items():
                    pieces.setdefault((plain_name_of(name, config.n_layers), tp_rank), []).append(
                        (osd, g, frag.start, frag.numel))

    def flat(osd: dict, g: int, key: str) -> torch.Tensor:
        if key == "fp32":
            return osd["single_partition_of_fp32_groups"][g]
        return osd["base_optimizer_state"]["state"][g][key]

    def read_state(name: str, key: str) -> torch.Tensor:
        parts = []
        for r in range(tp):
            if (name, r) not in pieces or (name, r) not in shapes:
                raise CheckpointError(f"{ckpt}: tensor-parallel rank {r} holds no {name}")
            frags = [flat(osd, g, key).narrow(0, start, n) for osd, g, start, n in pieces[(name, r)]]
            parts.append(_checked_shape(name, torch.cat(frags).float(), shapes[(name, r)]))
        return merge_shard(name, parts)

    base = first["optimizer_state_dict"]["base_optimizer_state"]
    if not base.get("state"):
        raise CheckpointError(f"{ckpt}: the optimizer has no state yet (saved before its first step)")
    return CheckpointState(ckpt=ckpt, meta=meta, config=config, layout=layout,
                           names=_model_order(config, {n for n, r in pieces if r == 0}),
                           step=base["state"][0]["step"], param_groups=list(base["param_groups"]),
                           global_state=_global_state(first),
                           model_states=_model_record(_load(ckpt / model_file(0))), _read=read_state,
                           _module=(_module_reader(ckpt, config, layout) or (None,))[0])


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


def _swapped(ckpt: Path, rank: int, key: str, n_groups: int) -> list[torch.Tensor]:
    """The NVMe-offloaded buffers of `key` of global rank `rank`, one per sub-group."""
    folder = ckpt / "offloaded_tensors" / f"rank{rank:02d}"
    prefix = "" if key == "fp32" else f"{key}-"
    files = [f for f in folder.glob(f"{prefix}*.tensor.swp") if key != "fp32" or not f.name.startswith("exp_avg")]
    if len(files) != n_groups:
        raise CheckpointError(f"{ckpt}: {len(files)} offloaded {key} file(s) in {folder}, the ZeRO-3 state "
                              f"needs {n_groups}")
    files.sort(key=lambda f: int(f.name.removeprefix(prefix).split("_")[0]))
    return [torch.from_numpy(np.fromfile(f, dtype=np.float32)) for f in files]


def _zero3(ckpt: Path, meta: dict, config: ModelConfig, layout: Layout) -> CheckpointState:
    tp, dp = layout.tp, layout.dp
    grid = _optim_files(ckpt, tp, dp)
    records, layouts = [], []  # per tp rank: model-state record; {name: (offset, numel, shape)}
    for r in range(tp):
        record = _load(ckpt / zero3_model_file(r))
        records.append(record)
        places, offset = {}, 0
        for group in record["param_shapes"]:
            for name, shape in group.items():
                numel = math.prod(shape)
                places[name] = (offset, numel, torch.Size(shape))
                offset += math.ceil(numel / dp)
        layouts.append(places)
    osds = [[_load(f)["optimizer_state_dict"] for f in files] for files in grid]
    topo = Topology(tp=tp, pp=1, dp=dp)

    def flats(osd: dict, key: str, global_rank: int) -> list[torch.Tensor]:
        n_groups = len(osd["fp32_flat_groups"])
        if key == "fp32":
            found = osd["fp32_flat_groups"]
        else:
            found = [osd["optimizer_state_dict"]["state"][i][key] for i in range(n_groups)]
        if all(t.numel() == 0 for t in found):  # NVMe offload: the values are in swap files
            return _swapped(ckpt, global_rank, key, n_groups)
        return found

    def read_state(name: str, key: str) -> torch.Tensor:
        parts = []
        for r in range(tp):
            if name not in layouts[r]:
                raise CheckpointError(f"{ckpt}: tensor-parallel rank {r} holds no {name}")
            offset, numel, shape = layouts[r][name]
            size = math.ceil(numel / dp)
            whole = torch.cat([_narrow_stream(flats(osd, key, topo.rank_of(0, d, r)), offset, size)
                               for d, osd in enumerate(osds[r])])
            parts.append(_checked_shape(name, whole[:numel].float(), shape))
        return merge_shard(name, parts)

    inner = osds[0][0]["optimizer_state_dict"]
    if not inner.get("state"):
        raise CheckpointError(f"{ckpt}: the optimizer has no state yet (saved before its first step)")
    first = {"optimizer_state_dict": osds[0][0], **{k: records[0][k] for k in ("ds_version",) if k in records[0]}}
    return CheckpointState(ckpt=ckpt, meta=meta, config=config, layout=layout, names=list(layouts[0]),
                           step=inner["state"][0]["step"], param_groups=list(inner["param_groups"]),
                           global_state=_global_state(first), model_states=_model_record(records[0]),
                           _read=read_state, _module=None)


# ---- universal -----------------------------------------------------------------------------
def _universal(ckpt: Path, meta: dict, config: ModelConfig, layout: Layout) -> CheckpointState:
    by_plain = {plain_name_of(n, config.n_layers): n for n in universal.param_names(ckpt)}
    if not by_plain:
        raise CheckpointError(f"{ckpt}: no parameters under {universal.ZERO_DIR}/")
    optim = universal.read_optimizer_state(ckpt)
    record = _load(ckpt / universal.MODEL_STATE_FILES[0])
    step = universal.read_step(ckpt, next(iter(by_plain.values())))

    def read_state(name: str, key: str) -> torch.Tensor:
        if name not in by_plain:
            raise CheckpointError(f"{ckpt}: no {name} under {universal.ZERO_DIR}/")
        return universal.read_state(ckpt, by_plain[name], key)

    return CheckpointState(ckpt=ckpt, meta=meta, config=config, layout=layout,
                           names=_model_order(config, by_plain), step=step,
                           param_groups=list(optim["param_groups"]),
                           global_state={k: optim[k] for k in GLOBAL_KEYS if k in optim},
                           model_states=_model_record(record), _read=read_state, _module=None)
