"""What megamm hooks into a live DeepSpeed engine: the save hook, the step-skip hook, and
reading the live weights (`live_fp32_weights`, for samples without a checkpoint).

Save hook: `recording_write_failures(engine, failures)`. Within the block a failed write
inside `engine.save_checkpoint` — its checkpoint engine's `save(state, path)` and its
`_copy_recovery_script(dir)`, the two places DeepSpeed 0.19.8 writes files — is appended
to `failures` instead of raised, so this rank still reaches DeepSpeed's barriers; after
a failure this rank writes nothing more. Both are replaced on the instance and restored
on exit (megamm.train.checkpoint's save protocol relies on this).

Step-skip hook. How DeepSpeed 0.19.8 skips a step: at the gradient-accumulation boundary
each optimizer wrapper checks the gradients before it touches any state, and on inf/NaN
clears them and returns (fp32 master weights, 16-bit copies, Adam moments and step count
unchanged); the engine counts `engine.skipped_steps`, reports `was_step_applied() ==
False` and does not step the LR scheduler.
  - ZeRO-1/2: `check_overflow()` when `check_grad_overflow` (fp16 always; bf16 from
    `bf16.check_grad_overflow`, default true; fp32 never), and a non-finite global norm
    counts as overflow unless the dtype is bf16 with the check off;
  - ZeRO-3: a non-finite global norm, any dtype;
  - ZeRO-0 bf16 (its bf16 optimizer) and fp16 (the loss scaler): the same;
  - ZeRO-0 fp32: the torch optimizer steps unconditionally; no skip exists.
`enable_step_skip(ds_cfg)` makes sure the skip is on (refusing ZeRO-0 fp32 and a config
that turns the check off); `step_applied(engine)` and `skipped_steps(engine)` read it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from deepspeed.utils import safe_get_full_fp32_param

from megamm.config import ConfigError


def one_line(e: Exception) -> str:
    """An exception as one line: an OS error as "<file>: <reason>", else "<type>: <first line>"."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def attempt(fn) -> str | None:
    """Run fn; its failure as one line (None if it succeeded)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any failure to write is a failed save, reported in one line
        return one_line(e)
    return None


@contextmanager
def recording_write_failures(engine, failures: list[str]):
    """See the module docstring: DeepSpeed's writes inside the block record their failures."""
    def guarded(fn, path_arg: tuple[int, str]):
        def call(*args, **kwargs):
            if failures:
                return None
            error = attempt(lambda: fn(*args, **kwargs))
            if error:
                index, name = path_arg
                path = str(kwargs[name] if name in kwargs else args[index])
                failures.append(error if path in error else f"{path}: {error}")
            return None
        return call

    targets = [(obj, name, arg, vars(obj).get(name)) for obj, name, arg in
               ((getattr(engine, "checkpoint_engine", None), "save", (1, "path")),
                (engine, "_copy_recovery_script", (0, "save_path")))
               if obj is not None and hasattr(obj, name)]
    for obj, name, arg, _ in targets:
        setattr(obj, name, guarded(getattr(obj, name), arg))
    try:
        yield
    finally:
        for obj, name, _, own in targets:
            if own is None:
                delattr(obj, name)  # back to the class's method
            else:
                setattr(obj, name, own)


def enable_step_skip(ds_cfg: dict) -> dict:
    """ds_cfg with DeepSpeed's non-finite-gradient skip switched on; ConfigError where
    DeepSpeed cannot skip a step (ZeRO-0 in fp32) or the config turns the check off."""
    stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    bf16, fp16 = ds_cfg.get("bf16", {}), ds_cfg.get("fp16", {})
    if bf16.get("enabled"):
        if bf16.get("check_grad_overflow") is False:
            raise ConfigError("bf16.check_grad_overflow is false in the DeepSpeed config: steps with "
                              "non-finite gradients would be applied; remove it")
        ds_cfg = {**ds_cfg, "bf16": {**bf16, "check_grad_overflow": True}}
    elif stage == 0 and not fp16.get("enabled"):
        raise ConfigError("ZeRO stage 0 in fp32 cannot skip a step with non-finite gradients; "
                          "use ZeRO stage >= 1 or bf16/fp16")
    return ds_cfg


def step_applied(engine) -> bool:
    """Whether the engine's last optimizer step changed the weights."""
    return bool(engine.was_step_applied())


def skipped_steps(engine) -> int:
    """Optimizer steps the engine has skipped since it was built (or resumed)."""
    return int(engine.skipped_steps)


def live_fp32_weights(engine) -> dict[str, torch.Tensor]:
    """This rank's parameters, by engine name (the plain model's), in fp32 on the CPU: the
    master weights the optimizer holds, whole over data parallelism (this rank's
    tensor-parallel shard), or the module's own weight where the engine keeps no master
    copy (ZeRO-0 under bf16) — the same choice `read(ckpt).weight` makes for its checkpoint.
    A collective under ZeRO-3: every rank calls it."""
    out = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        out[name] = (p if master is None else master).detach().float().cpu().clone()
    return out
