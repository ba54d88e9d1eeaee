"""The plain model (no process-group code): embeddings, blocks, heads, the loss."""
from megamm.model.heads import LossOutput
from megamm.model.init import init_weights, materialize
from megamm.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model", "LossOutput", "init_weights", "materialize"]
