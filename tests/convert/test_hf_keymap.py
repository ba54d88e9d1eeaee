"""The megamm <-> HF key map at unit level: a GQA model (n_kv_heads < n_heads) with
non-zero modality vectors converts into a stock LlamaForCausalLM with equal logits,
round-trips bit for bit, and what megamm cannot represent is refused."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megamm.config import ModelConfig, VocabConfig
from megamm.hf import ConversionError, fold_modality, from_hf, hf_config, model_config_from_hf, to_hf
from megamm.model import build_model

VOCAB = VocabConfig(text_size=100, n_special=16, image_codes=32, image_tokens=4, audio_codebooks=2,
                    audio_codebook_size=16, pad_multiple=64)


def gqa_model(tie=False, seed=0):
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, rope_theta=5e5, norm_eps=1e-6,
                      max_seq_len=64, vocab=VOCAB, kernels="torch", attention="sdpa", tie_embeddings=tie)
    model = build_model(cfg, seed=seed).eval()
    with torch.no_grad():  # trained models have non-zero modality vectors and norm weights
        model.embed.modality.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        for block in model.layers:
            block.attn_norm.weight.uniform_(0.5, 1.5)
    return model


def hf_model(model, sd):
    cfg = model.config
    from megamm.hf import exports_tied

    theirs = LlamaForCausalLM(LlamaConfig(**hf_config(cfg, exports_tied(sd, cfg), "float32"))).eval()
    missing, unexpected = theirs.load_state_dict(to_hf(sd, cfg), strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"])
    return theirs


@pytest.mark.parametrize("tie", [False, True])
def test_gqa_model_has_megamm_logits_in_stock_llama(tie):
    model = gqa_model(tie)
    sd = model.state_dict()
    theirs = hf_model(model, sd)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.vocab.used_size, (2, 40), generator=g)
    ids[ids == model.vocab.bos] = 0  # one document per row: HF attention has no document masks
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_round_trip_is_bit_exact():
    model = gqa_model()
    sd = model.state_dict()
    cfg = model.config
    back = from_hf(to_hf(sd, cfg), cfg)
    folded = fold_modality(sd, cfg)
    assert set(back) == set(sd)
    for name in sd:
        assert torch.equal(back[name], folded[name]), name
    again = from_hf(to_hf(back, cfg), cfg)  # a folded checkpoint is a fixed point
    assert all(torch.equal(again[n], back[n]) for n in back)
    assert not torch.equal(folded["embed.weight"], sd["embed.weight"])  # folding did something


def test_what_megamm_cannot_represent_is_refused():
    model = gqa_model()
    base = hf_config(model.config, False, "float32")
    assert model_config_from_hf(base, model.config) == model.config.replace(tie_embeddings=False)
    bad = [({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling RoPE type 'llama3'"),
           ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters RoPE type 'yarn'"),
           ({"model_type": "gpt2"}, "model_type 'gpt2'"),
           ({"attention_bias": True}, "attention_bias"),
           ({"hidden_act": "gelu"}, "hidden_act")]
    for change, words in bad:
        with pytest.raises(ConversionError, match=words.replace("(", r"\(")):
            model_config_from_hf({**base, **change}, model.config)
    hf_sd = to_hf(model.state_dict(), model.config)
    with pytest.raises(ConversionError, match="q_proj.bias"):
        from_hf({**hf_sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, model.config)
    with pytest.raises(ConversionError, match="shape"):
        from_hf({**hf_sd, "model.norm.weight": torch.ones(65)}, model.config)
