"""Loading pickled checkpoint files without running code from them.

A pickle can name any importable callable and call it while it loads; a checkpoint
folder from someone else can therefore run code on `torch.load(weights_only=False)`.
`torch.load(weights_only=True)` rebuilds only tensors, containers and plain values and
refuses every other global a pickle names. DeepSpeed's files also hold a few of its own
types (`deepspeed_types()`, found by `torch.serialization.get_unsafe_globals_in_checkpoint`
on ZeRO-0..3 checkpoints of DeepSpeed 0.19.8): they are allowed by name, nothing else.

DeepSpeed 0.19.8 loads its files with `torch.load(..., weights_only=False)`: through its
checkpoint engine (`TorchCheckpointEngine.load`, used by `engine.load_checkpoint` for
model, ZeRO and pipeline-layer files) and directly in `deepspeed.utils.zero_to_fp32`
(what `megamm.load_model` uses to merge ZeRO shards) and a few other tools. So
`refusing_unsafe_pickles(folder)` forces weights-only loading for every `torch.load`
inside its block, whatever the caller passes, with torch's own switches:
the TORCH_FORCE_WEIGHTS_ONLY_LOAD environment variable (read by torch.load at each
call) and the `torch.serialization.safe_globals` allow-list, both restored on exit.
A refused file becomes an UnsafeCheckpointError naming the file and the global.

Everything megamm writes itself is JSON, or tensors and plain values that load with
`torch.load(weights_only=True)` and no allow-list (rng_rank<r>.pt).
"""
from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch

from megamm.config import ConfigError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file that names a type or function outside the allow-list."""


def deepspeed_types() -> list:
    """The non-tensor types DeepSpeed 0.19.8 pickles into its checkpoint files."""
    # imported on first use: the checkpoint package reads files with torch alone, without importing DeepSpeed
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _allowed_names() -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in deepspeed_types()}


def unsafe_globals(path: Path) -> list[str]:
    """Globals a torch checkpoint file names beyond torch's defaults and deepspeed_types()
    (read from the pickle's opcodes; nothing is loaded)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: the loader itself will refuse it
        return []
    return sorted(set(found) - _allowed_names())


def describe_refusal(folder: Path, error: Exception) -> str:
    """One line naming the refused file(s) of `folder` and what they name."""
    culprits = [(p, g) for p in sorted(Path(folder).rglob("*.pt")) for g in [unsafe_globals(p)] if g]
    if culprits:
        return "; ".join(f"{p}: names {', '.join(g[:3])}" for p, g in culprits[:3]) + \
            " (not on megamm's allow-list of checkpoint types; refused, nothing from it was run)"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{folder}: a file was refused by the weights-only loader ({first})"


@contextmanager
def refusing_unsafe_pickles(folder):
    """Within the block every torch.load is weights-only with deepspeed_types() allowed;
    a refused pickle raises UnsafeCheckpointError naming its file under `folder`."""
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(describe_refusal(Path(folder), e)) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous
