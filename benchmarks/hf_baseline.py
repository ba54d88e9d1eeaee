"""The baseline a user would otherwise pick: stock `transformers.LlamaForCausalLM` with
megamm's shapes, trained under the same DeepSpeed config on the same batches.

`llama_config(cfg, seq_len)` maps a megamm ModelConfig to a LlamaConfig (same layers,
widths, heads, KV heads, FFN, RoPE theta, norm eps, padded vocabulary, tying);
`Baseline(...).step()` is one optimizer step; `train(...)` runs `steps` of them and returns
per-step records shaped like megamm.train.loop's (step, loss, tokens_per_s, step_time_s). Causal attention runs over
each packed row as a whole, as a user's plain Llama would.

The loss is `causal_lm_loss`, what HF's own `labels=` loss computes (fp32 logits,
cross-entropy with ignore_index -100, mean over counted targets) on the targets megamm
counts, so the two implementations train the same loss definition: `full`, a plain
softmax over the whole vocabulary; `modality`, the same with the ids the grammar forbids
masked to -inf on the model's full logits (what a user of the stock model would write
to train megamm's grammar loss).

With `compile`, each LlamaDecoderLayer's forward is compiled in place as megamm.train.compile
does for megamm's blocks (the layer's hooks outside the compiled region, each layer a ZeRO-3
leaf under ZeRO-3), so compiled is measured against compiled. HF checkpoints inside the
layer's forward, so there the checkpoint is traced inside the compiled region (no graph
break in the stock layer stops dynamo from tracing it).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from megamm.config import ModelConfig
from megamm.data.loader import PackedLoader, open_split
from megamm.train import ds_config
from megamm.vocab import Vocab


def llama_config(cfg: ModelConfig, seq_len: int, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                       max_position_embeddings=seq_len, rms_norm_eps=cfg.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                       use_cache=False, attn_implementation="sdpa")


def causal_lm_loss(logits, inputs, targets, vocab: Vocab, loss_scope: str, allowed=None, forbidden=None):
    """logits [B,S,V] of the stock model -> the mean cross-entropy over the targets megamm
    counts under `loss_scope` ("full" or "modality"); `allowed`, `forbidden`: a cached
    allowed_table() and its negation on the logits' device."""
    grammar = loss_scope != "full"
    allowed = vocab.allowed_table().to(logits.device) if allowed is None else allowed
    forbidden = ~allowed if forbidden is None else forbidden
    states, targets = vocab.states(inputs).reshape(-1), targets.reshape(-1)
    counted = vocab.counted_targets(states, targets, grammar, allowed)
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if grammar:  # one out-of-place pass over the logits
        logits = logits.masked_fill(forbidden[states], float("-inf"))
    labels = torch.where(counted, targets, torch.full_like(targets, -100))
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / counted.sum().clamp(min=1)


def compile_layers(model, zero3: bool) -> None:
    """torch.compile each decoder layer's forward in place (before deepspeed.initialize)."""
    from deepspeed.utils import set_z3_leaf_modules
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward)
    if zero3:
        set_z3_leaf_modules(model, [LlamaDecoderLayer])


class Baseline:
    """The Llama twin under its DeepSpeed engine, with its loader and cached grammar tables;
    `step()` is one optimizer step (what `train` times)."""

    def __init__(self, cfg: ModelConfig, ds_cfg: dict, data_dir, seed: int, device,
                 loss_scope: str = "full", compile: bool = False):
        import deepspeed
        import torch.distributed as dist
        from transformers import LlamaForCausalLM

        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.vocab, self.device, self.loss_scope = Vocab(cfg.vocab), device, loss_scope
        mb, self.gas = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
        self.loader = PackedLoader(open_split(data_dir, "train", self.vocab), self.vocab, cfg.max_seq_len, mb,
                                   self.rank, world, seed=seed)
        torch.manual_seed(seed)
        hf_cfg = llama_config(cfg, cfg.max_seq_len, self.vocab.size)
        if ds_config.zero_stage(ds_cfg) == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
                model = LlamaForCausalLM(hf_cfg)
        else:
            model = LlamaForCausalLM(hf_cfg).to(device)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if compile:
            compile_layers(model, ds_config.zero_stage(ds_cfg) == 3)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        self.tokens_per_step = mb * self.gas * world * cfg.max_seq_len
        self.allowed = self.vocab.allowed_table().to(device)
        self.forbidden = ~self.allowed

    def step(self) -> float:
        """One optimizer step over `gas` micro-batches -> its mean loss."""
        loss_sum = 0.0
        for _ in range(self.gas):
            inputs, targets = self.loader.next_batch()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            loss = causal_lm_loss(self.engine(input_ids=inputs).logits, inputs, targets, self.vocab,
                                  self.loss_scope, self.allowed, self.forbidden)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += float(loss.detach())
        return loss_sum / self.gas


def train(cfg: ModelConfig, ds_cfg: dict, data_dir, steps: int, seed: int, device,
          loss_scope: str = "full", compile: bool = False) -> list[dict]:
    """Train the Llama twin; rank 0's records (other ranks return [])."""
    b = Baseline(cfg, ds_cfg, data_dir, seed, device, loss_scope, compile)
    records = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss = b.step()
        dt = time.perf_counter() - t0
        if b.rank == 0:
            records.append({"step": step, "loss": loss, "tokens_per_s": b.tokens_per_step / dt,
                            "step_time_s": dt})
    return records
