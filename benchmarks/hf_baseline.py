"""The baseline a user would otherwise pick: stock `transformers.LlamaForCausalLM` with
megamm's shapes, trained under the same DeepSpeed config on the same batches.

`llama_config(cfg, seq_len)` maps a megamm ModelConfig to a LlamaConfig (same layers,
widths, heads, KV heads, FFN, RoPE theta, norm eps, padded vocabulary, tying);
`train(...)` runs `steps` optimizer steps with HF's own causal-LM loss (`labels=`, a
plain softmax over the whole vocabulary: compare with megamm's `--loss-scope full`)
and returns per-step records shaped like megamm.train.loop's (step, loss,
tokens_per_s, step_time_s). Causal attention runs over each packed row as a whole,
as a user's plain Llama would.
"""
from __future__ import annotations

import time

import torch

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


def train(cfg: ModelConfig, ds_cfg: dict, data_dir, steps: int, seed: int, device) -> list[dict]:
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
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    tokens_per_step = mb * gas * world * cfg.max_seq_len
    records = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(gas):
            inputs, _targets = loader.next_batch()
            inputs = inputs.to(device)
            loss = engine(input_ids=inputs, labels=inputs).loss
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        dt = time.perf_counter() - t0
        if rank == 0:
            records.append({"step": step, "loss": loss_sum / gas, "tokens_per_s": tokens_per_step / dt,
                            "step_time_s": dt})
    return records
