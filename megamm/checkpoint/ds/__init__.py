"""The one adapter to DeepSpeed: the only part of megamm that knows its checkpoint file
names, its optimizer-state layouts and the private methods megamm overrides or patches.
Everything else asks it:

    read(ckpt) -> CheckpointState     layout, per-parameter fp32 weights and Adam moments,
                                      16-bit module weights (read.py)
    universal.write_param / write_optimizer_state / MODEL_STATE_FILES / resume_config
                                      DeepSpeed's universal layout (universal.py)
    recording_write_failures(engine)  the save hook (hooks.py)
    enable_step_skip, step_applied, skipped_steps
                                      the step-skip hook (hooks.py)
    pipeline.pipeline_module(...)     the pipeline module with plain parameter names (pipeline.py;
                                      imported by the trainer only: it loads deepspeed.pipe)
    refusing_unsafe_pickles(folder)   weights-only loading, DeepSpeed's own types allowed (safe_load.py)

Written against DeepSpeed 0.19.8; upgrading DeepSpeed means reading these five files.
"""
from megamm.checkpoint.ds import universal
from megamm.checkpoint.ds.hooks import (attempt, enable_step_skip, one_line, recording_write_failures,
                                        skipped_steps, step_applied)
from megamm.checkpoint.ds.read import STATES, CheckpointState, Layout, has_legacy_names, read
from megamm.checkpoint.ds.safe_load import UnsafeCheckpointError, refusing_unsafe_pickles

__all__ = ["STATES", "CheckpointState", "Layout", "UnsafeCheckpointError", "attempt", "enable_step_skip",
           "has_legacy_names", "one_line", "read", "recording_write_failures", "refusing_unsafe_pickles",
           "skipped_steps", "step_applied", "universal"]
