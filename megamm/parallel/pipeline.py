"""Pipeline parallelism: the model's stages as a deepspeed.pipe.PipelineModule.

    layer 0            EmbeddingStage  (ids, targets) -> acts
    layers 1..L        BlockStage i    acts -> acts
    layer L+1          NormStage       acts -> acts
    layer L+2          HeadStage       acts -> (loss_sum, stats)

    acts = (hidden [B,S,D], positions [B,S], doc_ids [B,S], states [B,S], targets [B,S])

Only the hidden states carry gradients; the integer tensors, computed once from the
ids, ride along. Each stage wraps the plain model's module under the same attribute
name it has in Transformer (embed, block = layers.i, norm, head), builds it on the
meta device, shards it for tensor parallelism and initialises it from the seed under
its plain-model name, so every layout starts from the single-process weights.
Stages are balanced by parameter counts computed from the config (nothing is built
to count them). The last stage's loss function scales the summed loss and keeps the
per-modality statistics for the metrics.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megamm.config import ConfigError, ModelConfig
from megamm.model import materialize
from megamm.model.attention import document_positions
from megamm.model.heads import OutputHead, TokenEmbedding
from megamm.model.layers import Block, RMSNorm
from megamm.model.loss import N_STATS
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


class EmbeddingStage(nn.Module):
    def __init__(self, cfg: ModelConfig, tp, device, seed: int):
        super().__init__()
        self.vocab = Vocab(cfg.vocab)
        self.embed = _build(lambda d: TokenEmbedding(cfg, self.vocab, device=d), "embed.", tp, device, seed)

    def forward(self, inputs):
        ids, targets = inputs
        positions, doc_ids = document_positions(ids, self.vocab.bos)
        targets = self.vocab.loss_targets(ids, targets, self.embed.cfg.loss_scope)
        return self.embed(ids), positions, doc_ids, self.vocab.states(ids), targets


class BlockStage(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, tp, device, seed: int):
        super().__init__()
        self.block = _build(lambda d: Block(cfg, device=d), f"layers.{index}.", tp, device, seed)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing([self.block])

    def forward(self, acts):
        h, positions, doc_ids, states, targets = acts
        return self.block(h, positions, doc_ids), positions, doc_ids, states, targets


class NormStage(nn.Module):
    def __init__(self, cfg: ModelConfig, tp, device, seed: int):
        super().__init__()
        self.norm = _build(lambda d: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels, device=d),
                           "norm.", tp, device, seed)

    def forward(self, acts):
        h, *rest = acts
        return (self.norm(h), *rest)


class HeadStage(nn.Module):
    def __init__(self, cfg: ModelConfig, tp, device, seed: int):
        super().__init__()
        vocab = Vocab(cfg.vocab)
        self.head = _build(lambda d: OutputHead(cfg, vocab, device=d), "head.", tp, device, seed)

    def forward(self, acts):
        h, _, _, states, targets = acts
        return self.head(h, states, targets)


class PipelineLoss:
    """loss_fn of the pipeline engine: the last stage's (loss_sum, stats) -> the scaled
    loss to backpropagate; sums the statistics of the micro-batches it sees."""

    def __init__(self):
        self.scale = 1.0
        self.guard = None  # training: loss -> the loss to back-propagate (megamm.train.bad_steps)
        self.stats = torch.zeros(N_STATS, dtype=torch.float64)

    def __call__(self, outputs, labels):
        loss_sum, stats = outputs
        self.stats += stats.detach().double().cpu()
        loss = loss_sum * self.scale
        return self.guard(loss) if self.guard is not None else loss

    def take_stats(self) -> torch.Tensor:
        out, self.stats = self.stats, torch.zeros(N_STATS, dtype=torch.float64)
        return out


# The plain-model names of each pipeline layer's parameters: layer file key -> model key.
def plain_name(layer_index: int, n_layers: int, key: str) -> str:
    if 1 <= layer_index <= n_layers:
        return f"layers.{layer_index - 1}." + key.removeprefix("block.")
    return key  # embed.*, norm.*, head.* keep their names


def pipeline_name(name: str, n_layers: int) -> str:
    """Plain-model name -> the PipelineModule's parameter name ("<layer>.<key>"), the
    inverse of plain_name."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"{int(index) + 1}.block.{rest}"
    layer = {"embed": 0, "norm": n_layers + 1, "head": n_layers + 2}[name.split(".", 1)[0]]
    return f"{layer}.{name}"


def build_pipeline(cfg: ModelConfig, topo, tp: TensorParallel | None, device, seed: int):
    """(PipelineModule for this rank's stage, its PipelineLoss)."""
    if cfg.tie_embeddings:
        raise ConfigError("tie_embeddings with --pp > 1 is not supported yet; use --pp 1")
    specs = [LayerSpec(EmbeddingStage, cfg, tp, device, seed)]
    specs += [LayerSpec(BlockStage, cfg, i, tp, device, seed) for i in range(cfg.n_layers)]
    specs += [LayerSpec(NormStage, cfg, tp, device, seed), LayerSpec(HeadStage, cfg, tp, device, seed)]
    counts = cfg.parameter_counts()
    sizes = [counts["embedding"]] + [counts["block"]] * cfg.n_layers + [counts["final_norm"], counts["head"]]
    loss = PipelineLoss()
    module = _ConfigCountedPipeline(sizes, layers=specs, loss_fn=loss,
                                    topology=PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp,
                                                                           num_dp=topo.dp),
                                    partition_method="parameters")
    return module, loss


class _ConfigCountedPipeline(PipelineModule):
    """PipelineModule that balances stages by parameter counts from the config instead
    of building every layer on every rank to count them."""

    def __init__(self, layer_sizes: list[int], **kwargs):
        object.__setattr__(self, "_megamm_layer_sizes", layer_sizes)
        super().__init__(**kwargs)

    def _count_layer_params(self):
        return list(self._megamm_layer_sizes)
