"""tools/convert_to_hf.py on checkpoints of real tp=2, pp=2 and ZeRO-3 launches: stock
transformers loads the folder and computes megamm's logits, greedy generation agrees,
and the tokenizer covers and shows every id."""
import json
import os
import shutil

import pytest
import torch
from checkpoints import BASE, LAYOUTS, run_many, single_document, tool, train_all, write_data
from transformers import AutoTokenizer, LlamaForCausalLM

import megamm
from megamm.tokenizers import ImageTokenizer, TextTokenizer


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """layout -> (checkpoint save dir, exported HF folder)."""
    root = tmp_path_factory.mktemp("to_hf")
    data = write_data(root)
    out = {}
    for layout, save in train_all(data, root, LAYOUTS).items():
        proc = tool("convert_to_hf.py", "--checkpoint", save, "--out", root / f"{layout}_hf", "--dtype", "fp32")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[layout] = (save, root / f"{layout}_hf")
    out["data"] = data
    return out


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def load_pair(made, layout):
    save, hf_dir = made[layout]
    ours = megamm.load_model(save)
    theirs = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return ours, theirs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_logits_equal_megamm(made, layout):
    ours, theirs = load_pair(made, layout)
    assert bool(ours.embed.modality.detach().abs().sum() > 0)  # folding is exercised
    ids = torch.tensor([single_document(ours.vocab, seed, 64) for seed in (1, 2)])  # [2, 64]
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.shape == b.shape == (2, 64, ours.vocab.size)
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_greedy_generate_equals_megamm_greedy(made, layout):
    ours, theirs = load_pair(made, layout)
    text = TextTokenizer.load(made["data"].parent / "tokenizers" / "text")
    v = ours.vocab
    prompt = [v.bos, v.bot, *text.encode("the red digit")]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):  # megamm: argmax of the last position's logits, unconstrained
            nxt = int(ours(ids)[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == v.eos:
                break
        hf = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert hf[0].tolist() == ids[0].tolist()


def test_tokenizer_round_trips_text_and_shows_structure(made):
    _, hf_dir = made["tp2"]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = megamm.load_model(made["tp2"][0])
    v = model.vocab
    assert len(tok) == v.size
    text = TextTokenizer.load(made["data"].parent / "tokenizers" / "text")
    sentence = "hello world, the blue digit three"
    assert tok.encode(sentence, add_special_tokens=False) == text.encode(sentence)
    assert tok.decode(text.encode(sentence)) == sentence
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (v.bos, v.eos, v.pad)
    ids = [v.bos, v.boi, v.image_start + 7, v.image_start + 50, v.eoi,
           v.boa, *v.audio_ids([[1, 2, 3, 4]]).tolist(), v.eoa, v.eos]
    shown = tok.decode(ids)
    assert shown == "<bos><boi><img_7><img_50><eoi><boa><aud0_1><aud1_2><aud2_3><aud3_4><eoa><eos>"
    assert tok.convert_ids_to_tokens(v.size - 1) == f"<vocab_pad_{v.size - v.used_size - 1}>"


def test_folder_carries_the_modality_map_and_the_tokenizers(made):
    _, hf_dir = made["pp2"]
    info = json.loads((hf_dir / "megamm_modalities.json").read_text())
    model = megamm.load_model(made["pp2"][0])
    v = model.vocab
    assert info["ranges"]["image"] == [v.image_start, v.audio_start]
    assert info["image"]["tokens_per_image"] == v.cfg.image_tokens
    assert info["specials"]["eoa"] == v.eoa
    assert info["grammar"]["states"]["IMAGE_END"]["allowed_next"] == [[v.eoi, v.eoi + 1]]
    image = ImageTokenizer.load(hf_dir / info["image"]["tokenizer"])
    assert image.decode([[3] * v.cfg.image_tokens]).shape[-1] == 3
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["vocab_size"] == v.size and cfg["num_key_value_heads"] == model.config.n_kv_heads
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(theirs_names(hf_dir))


def theirs_names(hf_dir):
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict().keys()


def test_bad_input_is_one_line_and_nothing_is_half_written(made, tmp_path):
    save, hf_dir = made["zero3"]
    proc = tool("convert_to_hf.py", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "o")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "nope" in proc.stderr and not (tmp_path / "o").exists()
    proc = tool("convert_to_hf.py", "--checkpoint", save, "--out", hf_dir)
    assert proc.returncode == 2 and "--force" in proc.stderr, proc.stderr
    partial = tmp_path / "partial"
    step = save / (save / "latest").read_text().strip()
    partial.mkdir()
    for f in step.iterdir():  # a checkpoint that lost its optimizer/model partitions
        if f.name == "megamm.json":
            (partial / f.name).write_bytes(f.read_bytes())
    proc = tool("convert_to_hf.py", "--checkpoint", partial, "--out", tmp_path / "o")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".o")]
    again = tmp_path / "again"
    shutil.copytree(hf_dir, again)
    proc = tool("convert_to_hf.py", "--checkpoint", save, "--out", again, "--force", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "bfloat16"
    theirs = LlamaForCausalLM.from_pretrained(again)
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16


INIT_FROM = [("tp2", "pp2"), ("zero3", "tp2")]


@pytest.fixture(scope="module")
def init_runs(made, tmp_path_factory):
    """(source, layout) -> (what the run was initialised from, its save dir): one step of
    `layout` --init-from `source`'s checkpoint, or for tp2 the chain checkpoint -> HF ->
    megamm checkpoint -> training. Both runs share one launch."""
    root = tmp_path_factory.mktemp("init_from")
    inits = {}
    for source, layout in INIT_FROM:
        save, hf_dir = made[source]
        inits[source, layout] = save
        if source == "tp2":
            proc = tool("convert_from_hf.py", "--hf", hf_dir, "--out", root / "imported")
            assert proc.returncode == 0, proc.stderr
            inits[source, layout] = root / "imported"
    runs = {f"{s}_{lay}": (["--data", made["data"], *BASE, *LAYOUTS[lay][0], "--init-from", inits[s, lay],
                            "--max-steps", 1, "--save-dir", root / f"{s}_{lay}"], LAYOUTS[lay][1])
            for s, lay in INIT_FROM}
    run_many(runs, root)
    return {(s, lay): (inits[s, lay], root / f"{s}_{lay}") for s, lay in INIT_FROM}


@pytest.mark.parametrize("source,layout", INIT_FROM)
def test_init_from_starts_at_the_checkpoint_models_loss(made, init_runs, source, layout):
    """--init-from a checkpoint (directly, or after a round trip through the HF folder)
    under another layout: the first step's loss is that model's loss on the same batch."""
    from checkpoints import LOGGED_SEED

    from megamm.data.loader import PackedLoader, open_split

    save = made[source][0]
    init, run = init_runs[source, layout]
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    model = megamm.load_model(init)
    seq_len = BASE[BASE.index("--seq-len") + 1]
    loader = PackedLoader(open_split(made["data"], "train", model.vocab), model.vocab, seq_len, 1, 0, 1,
                          seed=LOGGED_SEED)
    x, y = loader.next_batch()
    with torch.no_grad():
        expected = model(x, y).loss.item()
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)
    scratch = json.loads((save / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(scratch - expected) > 1e-3  # a fresh model's first loss would differ
