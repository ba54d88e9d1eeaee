"""The one adapter to DeepSpeed: the only part of megamm that knows its checkpoint file
names, its optimizer-state layouts and the private methods megamm overrides or patches.
Everything else asks it:

    read(ckpt) -> CheckpointState       layout, per-parameter fp32 weights and Adam moments,
                                        16-bit module weights (read.py); write_module_weights
    universal.write_param, write_optimizer_state, MODEL_STATE_FILES, resume_config
                                        DeepSpeed's universal layout (universal.py)
    refusing_unsafe_pickles(folder)     weights-only loading, DeepSpeed's types allowed (safe_load.py)
    hooks.recording_write_failures      the save hook (hooks.py)
    hooks.enable_step_skip, step_applied, skipped_steps
                                        the step-skip hook (hooks.py)
    hooks.live_fp32_weights(engine)     the live master weights, for samples without a checkpoint
    pipeline.pipeline_module(...)       the pipeline module with plain parameter names (pipeline.py)

hooks and pipeline import DeepSpeed itself, so only the trainer imports them; what this
package exports here reads files with torch alone. Written against DeepSpeed 0.19.8:
upgrading DeepSpeed means reading these five files.
"""
from megamm.checkpoint.ds import universal
from megamm.checkpoint.ds.read import STATES, CheckpointState, Layout, has_legacy_names, read, write_module_weights
from megamm.checkpoint.ds.safe_load import UnsafeCheckpointError, refusing_unsafe_pickles

__all__ = ["STATES", "CheckpointState", "Layout", "UnsafeCheckpointError", "has_legacy_names", "read",
           "refusing_unsafe_pickles", "universal", "write_module_weights"]
