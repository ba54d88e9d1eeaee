"""tools/convert_from_hf.py: a megamm export comes back bit for bit; a plain text
Llama gains image/audio rows from the mean of its rows and keeps its text logits."""
import pytest
import torch
from checkpoints import tool
from test_hf_keymap import gqa_model
from transformers import LlamaConfig, LlamaForCausalLM

import megamm
from megamm.hf import fold_modality
from megamm.hf_folder import MODALITIES_FILE, save_sharded, write_json
from megamm.hf import exports_tied, hf_config, to_hf
from megamm.checkpoint import checkpoint_dir, consolidated_state_dict


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def export(model, out):
    """A megamm-style HF folder of `model` (weights, config.json, the modality map)."""
    sd, cfg = model.state_dict(), model.config
    out.mkdir()
    save_sharded(to_hf(sd, cfg), out, max_shard_bytes=40_000)  # several shards
    write_json(out / "config.json", hf_config(cfg, exports_tied(sd, cfg), "float32"))
    write_json(out / MODALITIES_FILE, {"model_config": cfg.to_dict()})
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_megamm_export_round_trips_bit_for_bit(tmp_path, tie):
    model = gqa_model(tie)
    hf_dir = export(model, tmp_path / "hf")
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    proc = tool("convert_from_hf.py", "--hf", hf_dir, "--out", tmp_path / "ck")
    assert proc.returncode == 0, proc.stderr
    back = consolidated_state_dict(checkpoint_dir(tmp_path / "ck"))
    folded = fold_modality(model.state_dict(), model.config)
    assert set(back) == set(folded)
    for name in folded:
        assert torch.equal(back[name], folded[name]), name
    loaded = megamm.load_model(tmp_path / "ck")
    ids = torch.randint(0, model.vocab.used_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=1e-5)


def test_text_llm_gains_modality_rows_from_the_mean(tmp_path):
    hf_cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(hf_cfg).eval()
    llm.save_pretrained(tmp_path / "llm")
    proc = tool("convert_from_hf.py", "--hf", tmp_path / "llm", "--out", tmp_path / "ck", "--model-config", "tiny")
    assert proc.returncode == 0, proc.stderr
    model = megamm.load_model(tmp_path / "ck")
    v, cfg = model.vocab, model.config
    assert (cfg.n_kv_heads, cfg.d_model, cfg.vocab.text_size) == (2, 128, 300)
    assert cfg.vocab.image_codes == megamm.get_preset("tiny").vocab.image_codes
    table = model.embed.weight.detach()
    old = llm.model.embed_tokens.weight.detach()
    assert torch.equal(table[:300], old)
    assert torch.allclose(table[v.image_start + 5], old.mean(0)) and torch.allclose(table[-1], old.mean(0))
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :300], llm(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_bad_hf_folders_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = tool("convert_from_hf.py", "--hf", tmp_path / "empty", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "config.json" in proc.stderr and len(proc.stderr.splitlines()) == 1
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    write_json(gpt / "config.json", {"model_type": "gpt2", "vocab_size": 50})
    proc = tool("convert_from_hf.py", "--hf", gpt, "--out", tmp_path / "o", "--model-config", "tiny")
    assert proc.returncode == 2 and "gpt2" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = tool("convert_from_hf.py", "--hf", gpt, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--model-config" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_imported_checkpoint_exports_again_without_tokenizers(tmp_path):
    """HF -> megamm -> HF: the second export loads in stock transformers with the same
    logits, and with no tokenizers known its tokenizer still names every id."""
    from transformers import AutoTokenizer

    model = gqa_model()
    export(model, tmp_path / "hf0")
    assert tool("convert_from_hf.py", "--hf", tmp_path / "hf0", "--out", tmp_path / "ck").returncode == 0
    proc = tool("convert_to_hf.py", "--checkpoint", tmp_path / "ck", "--out", tmp_path / "hf")
    assert proc.returncode == 0 and "names no tokenizers" in proc.stdout, proc.stderr
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    v = model.vocab
    ids = torch.randint(0, v.used_size, (1, 30), generator=torch.Generator().manual_seed(2))
    ids[ids == v.bos] = 0
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-5
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tok) == v.size
    shown = tok.decode([v.bos, v.bot, 3, v.eot, v.boi, v.image_start + 2, v.eoi, v.boa,
                        *v.audio_ids([[1, 2]]).tolist(), v.eoa]).split()
    assert shown == ["<bos>", "<bot>", "<text_3>", "<eot>", "<boi>", "<img_2>", "<eoi>", "<boa>",
                     "<aud0_1>", "<aud1_2>", "<eoa>"]


def test_init_from_a_missing_or_mismatched_checkpoint_is_one_line(tmp_path):
    from checkpoints import run_train

    from megamm.config import get_preset
    from megamm.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", get_preset("tiny").vocab, n_train=20, n_val=4)
    model = gqa_model()  # 2 layers: not the tiny preset's shape
    export(model, tmp_path / "hf")
    assert tool("convert_from_hf.py", "--hf", tmp_path / "hf", "--out", tmp_path / "ck").returncode == 0
    for init, words in ((tmp_path / "nope", "checkpoint not found"), (tmp_path / "ck", "n_layers=2")):
        proc = run_train(["--data", data, "--ds_config", "zero1.json", "--seq-len", 32, "--max-steps", 1,
                          "--init-from", init])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and words in errors[0], proc.stderr[-2000:]
