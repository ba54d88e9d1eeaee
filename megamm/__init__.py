"""megamm: one decoder-only transformer over text, image and audio tokens, trained
under DeepSpeed from a laptop CPU to many GPUs."""
from megamm.config import ModelConfig, VocabConfig, get_preset, PRESETS

__version__ = "0.1.0"


def load_model(path):
    """Load a megamm checkpoint directory into one plain model on CPU, in eval mode.

    Returns the model; its config is `model.config`. Calling it on token ids
    `[batch, seq]` returns logits `[batch, seq, vocab]`.
    """
    # imported on call, so that `import megamm` (and every tool that reads only configs)
    # does not load torch and the checkpoint package
    from megamm.checkpoint import load_model as _load

    return _load(path)


__all__ = ["ModelConfig", "VocabConfig", "get_preset", "PRESETS", "load_model", "__version__"]
