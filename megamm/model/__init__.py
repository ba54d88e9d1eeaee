"""The plain model (no process-group code): embeddings, blocks, heads."""
from megamm.model.heads import LossOutput
from megamm.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model", "LossOutput"]
