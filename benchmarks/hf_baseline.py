"""The baseline a user would otherwise pick: stock `transformers.LlamaForCausalLM` with
megamm's shapes, trained under the same DeepSpeed config on the same batches.

`llama_config(cfg, seq_len)` maps a megamm ModelConfig to a LlamaConfig (same layers,
widths, heads, KV heads, FFN, RoPE theta, norm eps, padded vocabulary, tying);
`train(...)` runs `steps` optimizer steps and returns per-step records shaped like
megamm.train.loop's (step, loss, tokens_per_s, step_time_s). Causal attention runs over
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


def train(cfg: ModelConfig, ds_cfg: dict, data_dir, steps: int, seed: int, device,
          loss_scope: str = "full", compile: bool = False) -> list[dict]:
    """Train the Llama twin; rank 0's records (other ranks return [])."""
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = Vocab(cfg.vocab)
    mb, gas = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    loader = PackedLoader(open_split(data_dir, "train", vocab), vocab, cfg.max_seq_len, mb, rank, world, seed=seed)
    torch.manual_seed(seed)
    hf_cfg = llama_config(cfg, cfg.max_seq_len, vocab.size)
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
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    tokens_per_step = mb * gas * world * cfg.max_seq_len
    allowed = vocab.allowed_table().to(device)
    forbidden = ~allowed
    records = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(gas):
            inputs, targets = loader.next_batch()
            inputs, targets = inputs.to(device), targets.to(device)
            loss = causal_lm_loss(engine(input_ids=inputs).logits, inputs, targets, vocab, loss_scope,
                                  allowed, forbidden)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        dt = time.perf_counter() - t0
        if rank == 0:
            records.append({"step": step, "loss": loss_sum / gas, "tokens_per_s": tokens_per_step / dt,
                            "step_time_s": dt})
    return records
