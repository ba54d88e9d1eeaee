"""The checkpoint format, below train and eval: where a save directory keeps what
(layout), what megamm.json says (meta), every file's checksum (manifest), and one
consolidation path from any layout's files to the plain model's weights.

    megamm.checkpoint.load_model(path)              one plain model on CPU, eval mode
    megamm.checkpoint.consolidated_state_dict(ckpt) its weights under plain-model names

Everything megamm knows about DeepSpeed's on-disk names, state layouts and private
methods lives in `megamm.checkpoint.ds`, the one adapter; the rest of megamm asks it.
Saving and resuming a live engine (the atomic-save protocol) is megamm.train.checkpoint.
"""
from megamm.checkpoint.consolidate import consolidated_state_dict, load_model
from megamm.checkpoint.layout import (LATEST, META_FILE, TOKENIZERS_DIR, CheckpointError, checkpoint_dir,
                                      has_latest, latest_tag, read_meta, step_dirs, step_of, tokenizers_dir,
                                      verified_checkpoint_dir)

__all__ = ["LATEST", "META_FILE", "TOKENIZERS_DIR", "CheckpointError", "checkpoint_dir", "consolidated_state_dict",
           "has_latest", "latest_tag", "load_model", "read_meta", "step_dirs", "step_of", "tokenizers_dir",
           "verified_checkpoint_dir"]
