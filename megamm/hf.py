"""megamm <-> Hugging Face Llama: the one key map and the config mapping.

Every converter (tools/convert_to_hf.py, tools/convert_from_hf.py) goes through
`to_hf` / `from_hf`; nothing else knows HF names. Both take and return plain state
dicts (name -> tensor) of the whole model, no files.

    megamm (plain model)                 HF LlamaForCausalLM
    embed.weight (+ embed.modality)  ->  model.embed_tokens.weight   modality vectors folded in
    layers.N.attn_norm.weight        <-> model.layers.N.input_layernorm.weight
    layers.N.attn.{q,k,v,o}_proj     <-> model.layers.N.self_attn.{q,k,v,o}_proj
    layers.N.mlp_norm.weight         <-> model.layers.N.post_attention_layernorm.weight
    layers.N.mlp.{gate,up,down}_proj <-> model.layers.N.mlp.{gate,up,down}_proj
    norm.weight                      <-> model.norm.weight
    head.weight                      <-> lm_head.weight              rows grouped per modality

The weights need no permutation: megamm's RoPE is HF's rotate-half convention
(megamm.kernels.apply_rope_reference) with heads contiguous in the projections, and
GQA keeps n_kv_heads groups of head_dim rows in k_proj/v_proj as HF does. A folder
whose RoPE is anything else (scaled, interleaved, partial) is refused by
`model_config_from_hf`, never silently permuted.

Folding is one-way: `from_hf(to_hf(sd))` equals `fold_modality(sd)` bit for bit (the
modality vectors come back as zeros, already inside the rows), so a checkpoint whose
modality vectors are zero round-trips exactly.
"""
from __future__ import annotations

import re

import torch

from megamm.config import ConfigError, ModelConfig
from megamm.vocab import SPECIAL_NAMES, Vocab


class ConversionError(ConfigError):
    """Weights or a config that cannot be converted; the message names the culprit."""


# (megamm name, HF name); "{}" is the layer index. Embedding and head are handled by
# name too; the modality vectors have no HF counterpart (they are folded).
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{}.attn_norm.weight", "model.layers.{}.input_layernorm.weight"),
    ("layers.{}.attn.q_proj.weight", "model.layers.{}.self_attn.q_proj.weight"),
    ("layers.{}.attn.k_proj.weight", "model.layers.{}.self_attn.k_proj.weight"),
    ("layers.{}.attn.v_proj.weight", "model.layers.{}.self_attn.v_proj.weight"),
    ("layers.{}.attn.o_proj.weight", "model.layers.{}.self_attn.o_proj.weight"),
    ("layers.{}.mlp_norm.weight", "model.layers.{}.post_attention_layernorm.weight"),
    ("layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.gate_proj.weight"),
    ("layers.{}.mlp.up_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
    ("layers.{}.mlp.down_proj.weight", "model.layers.{}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
)
MODALITY_KEY = "embed.modality"


def _compile(direction: int) -> list[tuple[re.Pattern, str]]:
    rules = []
    for pair in KEY_MAP:
        src, dst = pair[direction], pair[1 - direction]
        rules.append((re.compile(re.escape(src).replace(r"\{\}", r"(\d+)")), dst))
    return rules


_TO_HF, _FROM_HF = _compile(0), _compile(1)


def rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, dst in rules:
        m = pattern.fullmatch(name)
        if m:
            return dst.replace("{}", m.group(1)) if m.groups() else dst
    return None


def fold_modality(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The same model with its modality vectors added into the embedding rows (and the
    vectors zeroed): the form an HF export holds. Same arithmetic as
    TokenEmbedding.folded_table, so logits are unchanged."""
    out = dict(sd)
    modality = sd[MODALITY_KEY]  # [4, D]
    table = Vocab(cfg.vocab).modality_table()  # [V] modality of each id
    out["embed.weight"] = sd["embed.weight"] + modality[table]  # [V, D]
    out[MODALITY_KEY] = torch.zeros_like(modality)
    return out  # a tied head keeps the unfolded rows (exports_tied says how to export it)


def exports_tied(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> bool:
    """An HF export ties lm_head to the embedding only when that is still true after
    folding (tied weights and zero modality vectors)."""
    return cfg.tie_embeddings and not bool(sd[MODALITY_KEY].any())


def to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole plain-model state dict -> HF Llama names (modality vectors folded;
    lm_head left out when the export is tied)."""
    expected = _expected_names(cfg)
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ConversionError(f"state dict does not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tied = exports_tied(sd, cfg)
    out = {}
    for name, t in fold_modality(sd, cfg).items():
        if name == MODALITY_KEY or (tied and name == "head.weight"):
            continue
        out[rename(name, _TO_HF)] = t.contiguous()
    return out


def from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama names -> a plain-model state dict for `cfg` (modality vectors zero; a
    missing lm_head means tied to the embedding). Shapes must already match cfg."""
    out = {}
    for name, t in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older exports carry; recomputed from rope_theta
        mine = rename(name, _FROM_HF)
        if mine is None:
            raise ConversionError(f"HF weight {name!r} has no place in a megamm model "
                                  f"(not a Llama layout: biases, MoE or extra norms are not supported)")
        out[mine] = t
    if "head.weight" not in out and "embed.weight" in out:
        out["head.weight"] = out["embed.weight"]
    if "embed.weight" in out:
        out[MODALITY_KEY] = torch.zeros(4, cfg.d_model, dtype=out["embed.weight"].dtype)
    expected = _expected_names(cfg)
    missing = sorted(expected - set(out))
    if missing:
        raise ConversionError(f"HF weights lack {rename(missing[0], _TO_HF) or missing[0]} "
                              f"({len(missing)} megamm weights missing)")
    shapes = _expected_shapes(cfg)
    for name, t in out.items():
        if tuple(t.shape) != shapes[name]:
            raise ConversionError(f"{rename(name, _TO_HF) or name}: shape {list(t.shape)}, "
                                  f"the model config needs {list(shapes[name])}")
    return out


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, v, hd, f = cfg.d_model, cfg.vocab.padded_size, cfg.head_dim, cfg.ffn_dim
    shapes = {"embed.weight": (v, d), MODALITY_KEY: (4, d), "norm.weight": (d,), "head.weight": (v, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
                       p + "attn.q_proj.weight": (cfg.n_heads * hd, d),
                       p + "attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
                       p + "attn.v_proj.weight": (cfg.n_kv_heads * hd, d),
                       p + "attn.o_proj.weight": (d, cfg.n_heads * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return shapes


def _expected_names(cfg: ModelConfig) -> set[str]:
    return set(_expected_shapes(cfg))


# ---- config.json ---------------------------------------------------------------------
def hf_config(cfg: ModelConfig, tied: bool, dtype: str) -> dict:
    """config.json of a LlamaForCausalLM equal to the megamm model `cfg`."""
    vocab = Vocab(cfg.vocab)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab.padded_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "tie_word_embeddings": tied, "use_cache": True,
        "bos_token_id": vocab.bos, "eos_token_id": vocab.eos, "pad_token_id": vocab.pad,
        "torch_dtype": dtype, "dtype": dtype,
    }


def generation_config(cfg: ModelConfig) -> dict:
    vocab = Vocab(cfg.vocab)
    return {"bos_token_id": vocab.bos, "eos_token_id": vocab.eos, "pad_token_id": vocab.pad,
            "max_length": cfg.max_seq_len}


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def model_config_from_hf(hf: dict, base: ModelConfig) -> ModelConfig:
    """The megamm config of an HF Llama-layout config.json: the architecture from `hf`,
    everything else (vocabulary layout, loss, kernels) from `base`. Refuses what megamm
    cannot represent, naming the field."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"config.json: model_type {kind!r} is not a Llama layout "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"config.json: {flag}=true is not supported (megamm has no biases)")
    if kind == "qwen2":  # Qwen2 always has q/k/v biases
        raise ConversionError("config.json: qwen2 models carry q/k/v biases, which megamm does not have")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act {act!r} is not SwiGLU's silu")
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5 and 4 spellings
        spec = hf.get(key) or {}
        rope_type = spec.get("rope_type", spec.get("type", "default"))
        if rope_type != "default":
            raise ConversionError(f"config.json: {key} RoPE type {rope_type!r} is not supported "
                                  f"(megamm implements plain rotate-half RoPE only)")
    rope = hf.get("rope_parameters") or {}
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("config.json: partial_rotary_factor != 1 is not supported")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ConversionError(f"config.json: head_dim={head_dim} x heads={heads} != hidden_size={d}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return base.replace(n_layers=hf["num_hidden_layers"], d_model=d, n_heads=heads,
                        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
                        rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                        max_seq_len=hf.get("max_position_embeddings", base.max_seq_len),
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def special_token_names(cfg: ModelConfig) -> list[str]:
    """`<pad>`, `<bos>`, ... then `<reserved_K>` for the unnamed special ids."""
    named = [f"<{n}>" for n in SPECIAL_NAMES]
    return named + [f"<reserved_{k}>" for k in range(len(named), cfg.vocab.n_special)]


def extend_vocab(hf_sd: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A text LLM's HF weights with the embedding (and lm_head) grown to `rows`: the new
    rows (specials, image and audio codes, padding) start as the mean of the existing
    rows, as Emu3/AnyGPT-style models are initialised from a text LLM."""
    out = dict(hf_sd)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in hf_sd:
            continue
        t = hf_sd[name]  # [V_text, D]
        if t.shape[0] > rows:
            raise ConversionError(f"{name} has {t.shape[0]} rows, more than the {rows} of the megamm vocabulary")
        mean = t.float().mean(0, keepdim=True).to(t.dtype)  # [1, D]
        out[name] = torch.cat([t, mean.expand(rows - t.shape[0], -1)])  # [rows, D]
    return out
