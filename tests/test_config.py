import pytest
import torch

from megamm.config import PRESETS, ConfigError, ModelConfig, VocabConfig, get_preset
from megamm.model import Transformer


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_formula_matches_the_built_model(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg, device="meta")
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_8b_preset_is_8_billion_and_llama_shaped():
    cfg = get_preset("8b")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (32, 4096, 32, 8, 14336)
    assert cfg.rope_theta == 1e6
    assert 8.0e9 <= cfg.num_parameters() <= 8.7e9


def test_tiny_preset_is_the_seed_reference_model():
    cfg = get_preset("tiny")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (4, 128, 4)
    assert cfg.num_parameters() < 2e6


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(d_model=130, n_heads=4), "n_heads=4 does not divide d_model=130"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
    (dict(n_layers=0), "n_layers"),
    (dict(loss_scope="half"), "loss_scope"),
    (dict(attention="magic"), "attention"),
    (dict(kernels="cuda"), "kernels"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(d_model=12, n_heads=4), "head_dim=3 must be even"),
])
def test_impossible_configs_fail_with_one_line_naming_the_field(kwargs, culprit):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    assert culprit in str(e.value) and "\n" not in str(e.value)


def test_bad_vocab_and_unknown_preset():
    with pytest.raises(ConfigError, match="image_tokens"):
        VocabConfig(image_tokens=0)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")


def test_config_round_trips_through_dict():
    cfg = get_preset("small").replace(z_loss=1e-4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_parts_add_up(name):
    c = PRESETS[name].parameter_counts()
    assert c["total"] == c["embedding"] + c["blocks"] + c["final_norm"] + c["head"]
    assert c["blocks"] == PRESETS[name].n_layers * c["block"]
    assert c["block"] == c["block_matrices"] + c["block_norms"]


@pytest.mark.parametrize("tp, culprit", [(3, "n_kv_heads=8"), (16, "n_kv_heads=8"), (0, "--tp must be >= 1")])
def test_tensor_parallel_degree_that_does_not_divide_is_refused(tp, culprit):
    with pytest.raises(ConfigError, match=culprit):
        get_preset("8b").check_tensor_parallel(tp)
    get_preset("8b").check_tensor_parallel(8)  # 8 kv heads, FFN 14336, vocab rows all split by 8
