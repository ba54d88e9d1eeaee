"""Pipeline parallelism: the model's stages as a deepspeed.pipe.PipelineModule.

    layer 0            EmbeddingStage  (ids, targets) -> acts
    layers 1..L        BlockStage i    acts -> acts
    layer L+1          NormStage       acts -> acts
    layer L+2          HeadStage       acts -> (loss_sum, stats)

    acts = (hidden [B,S,D], positions [B,S], doc_ids [B,S], states [B,S], targets [B,S])

Only the hidden states carry gradients; the integer tensors, computed once from the
ids (megamm.model.transformer.stream_tensors, as the plain model does), ride along.
Each stage holds one of the plain model's modules (`stage.module`, its attribute
`stage.PART`), built on the meta device, sharded for tensor parallelism and initialised
from the seed under its plain-model name, so every layout starts from the
single-process weights. `stage.plain_path` is where that module sits in Transformer
("embed", "layers.<i>", "norm", "head"): the pipeline module DeepSpeed runs
(megamm.checkpoint.ds.pipeline_module) registers each stage's module there, so the
engine's parameter names are the plain model's. Stages are balanced by parameter
counts computed from the config (nothing is built to count them). The last stage's
loss function scales the summed loss and keeps the per-modality statistics.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec
from torch import nn

from megamm.config import ConfigError, ModelConfig
from megamm.model import materialize
from megamm.model.heads import OutputHead, TokenEmbedding
from megamm.model.layers import Block, RMSNorm
from megamm.model.loss import N_STATS
from megamm.model.transformer import stage_paths, stream_tensors
from megamm.parallel.build import apply_activation_checkpointing
from megamm.parallel.tensor_parallel import TensorParallel, parallelize
from megamm.vocab import Vocab


def _build(module_fn, prefix: str, tp: TensorParallel | None, device, seed: int) -> nn.Module:
    """module_fn(device) built on meta, sharded and initialised under its plain-model
    name prefix (e.g. "layers.3.")."""
    with torch.device("meta"):
        module = module_fn("meta")
    if tp is not None:
        parallelize(module, tp, prefix)
    return materialize(module, device, seed, prefix)


class _Stage(nn.Module):
    PART = ""
    """The attribute holding the plain model's module (the first key of DeepSpeed's layer file)."""
    plain_path = ""

    @property
    def module(self) -> nn.Module:
        return getattr(self, self.PART)


class EmbeddingStage(_Stage):
    PART, plain_path = "embed", "embed"

    def __init__(self, cfg: ModelConfig, tp, device, seed: int):
        super().__init__()
        self.vocab = Vocab(cfg.vocab)
        self.loss_scope = cfg.loss_scope
        self.embed = _build(lambda d: TokenEmbedding(cfg, self.vocab, device=d), "embed.", tp, device, seed)

    def forward(self, inputs):
        ids, targets = inputs
        positions, doc_ids, states, targets = stream_tensors(self.vocab, ids, targets, self.loss_scope)
        return self.embed(ids), positions, doc_ids, states, targets


class BlockStage(_Stage):
    PART = "block"

    def __init__(self, cfg: ModelConfig, index: int, tp, device, seed: int):
        super().__init__()
        self.plain_path = f"layers.{index}"
        self.block = _build(lambda d: Block(cfg, device=d), f"layers.{index}.", tp, device, seed)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing([self.block])

    def forward(self, acts):
        h, positions, doc_ids, states, targets = acts
        return self.block(h, positions, doc_ids), positions, doc_ids, states, targets


class NormStage(_Stage):
    PART, plain_path = "norm", "norm"

    def __init__(self, cfg: ModelConfig, tp, device, seed: int):
        super().__init__()
        self.norm = _build(lambda d: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels, device=d),
                           "norm.", tp, device, seed)

    def forward(self, acts):
        h, *rest = acts
        return (self.norm(h), *rest)


class HeadStage(_Stage):
    PART, plain_path = "head", "head"

    def __init__(self, cfg: ModelConfig, tp, device, seed: int):
        super().__init__()
        vocab = Vocab(cfg.vocab)
        self.head = _build(lambda d: OutputHead(cfg, vocab, device=d), "head.", tp, device, seed)

    def forward(self, acts):
        h, _, _, states, targets = acts
        return self.head(h, states, targets)


class PipelineLoss:
    """loss_fn of the pipeline engine: the last stage's (loss_sum, stats[, row_stats]) ->
    the scaled loss to backpropagate; sums the statistics of the micro-batches it sees and
    keeps their row statistics."""

    def __init__(self):
        self.scale = 1.0
        self.guard = None  # training: loss -> the loss to back-propagate (megamm.train.bad_steps)
        self.stats = torch.zeros(N_STATS, dtype=torch.float64)
        self.rows: list[torch.Tensor] = []  # each micro-batch's row_stats, when the head gives them

    def __call__(self, outputs, labels):
        loss_sum, stats, *rows = outputs
        self.stats += stats.detach().double().cpu()
        self.rows += [r.detach().double().cpu() for r in rows]
        loss = loss_sum * self.scale
        return self.guard(loss) if self.guard is not None else loss

    def take_stats(self) -> torch.Tensor:
        out, self.stats = self.stats, torch.zeros(N_STATS, dtype=torch.float64)
        return out

    def take_rows(self) -> list[torch.Tensor]:
        """The row_stats [2, B] of the micro-batches since the last call, in order (the last stage's)."""
        out, self.rows = self.rows, []
        return out


def pipeline_layers(cfg: ModelConfig, tp: TensorParallel | None, device, seed: int):
    """(LayerSpec of every pipeline layer, each layer's parameter count, the PipelineLoss):
    what megamm.checkpoint.ds.pipeline_module turns into DeepSpeed's pipeline module."""
    if cfg.tie_embeddings:
        raise ConfigError("tie_embeddings with --pp > 1 is not supported yet; use --pp 1")
    specs = [LayerSpec(EmbeddingStage, cfg, tp, device, seed)]
    specs += [LayerSpec(BlockStage, cfg, i, tp, device, seed) for i in range(cfg.n_layers)]
    specs += [LayerSpec(NormStage, cfg, tp, device, seed), LayerSpec(HeadStage, cfg, tp, device, seed)]
    assert len(specs) == len(stage_paths(cfg.n_layers))
    counts = cfg.parameter_counts()
    sizes = [counts["embedding"]] + [counts["block"]] * cfg.n_layers + [counts["final_norm"], counts["head"]]
    return specs, sizes, PipelineLoss()
