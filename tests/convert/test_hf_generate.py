"""Stock transformers `generate()` on a megamm HF export obeys the modality grammar with
megamm.hf_generation.ModalityGrammarLogitsProcessor: an image is exactly N codes then
<eoi>, audio whole frames in per-codebook ranges, and greedy decoding equals megamm's own
greedy sampler token for token. The export is of a tiny checkpoint trained 2 steps
(default loss scope) in one plain-python run, then tools/convert_to_hf.py."""
import json
import re

import pytest
import torch
from checkpoints import BASE, ROOT, run_train, tool, write_data
from transformers import AutoModelForCausalLM, AutoTokenizer

import megamm
from megamm.config import get_preset
from megamm.generate import MultimodalGenerator, Sampling, left_pad, sample
from megamm.hf_folder import modalities
from megamm.hf_generation import ModalityGrammarLogitsProcessor
from megamm.tokenizers import Tokenizers
from megamm.vocab import Vocab

CAPTIONS = ["the red digit seven", "a blue three and a green five is spoken"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(megamm model, stock HF model, HF folder, the exported tokenizers)."""
    root = tmp_path_factory.mktemp("hf_generate")
    data = write_data(root)
    proc = run_train(["--data", data, *BASE, "--ds_config", "cpu.json", "--save-dir", root / "run"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    conv = tool("convert_to_hf.py", "--checkpoint", root / "run", "--out", root / "hf", "--dtype", "fp32")
    assert conv.returncode == 0, conv.stderr[-3000:]
    ours = megamm.load_model(root / "run").eval()
    assert ours.config.loss_scope == "modality"
    theirs = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    return ours, theirs, root / "hf", Tokenizers.load(root / "hf" / "megamm_tokenizers")


def hf_generate(model, rows, pad, **kw):
    """Stock generate() on prompts of any lengths, left-padded -> each row's new ids."""
    ids = left_pad(rows, pad)
    width = ids.shape[1]
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r)] for r in rows])).long()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    return out[:, width:].tolist()


# ---- the processor alone, on hand-built ids ------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """(processor from a tiny export's modality map as read from JSON, that map)."""
    info = json.loads(json.dumps(modalities(get_preset("tiny"), {})))
    return ModalityGrammarLogitsProcessor.from_modalities(info), info


def expected_sets(info):
    """Allowed id sets by hand, from the JSON's ranges and specials only."""
    r, sp, C, K = info["ranges"], info["specials"], info["audio"]["codebooks"], info["audio"]["codebook_size"]
    text, image = set(range(*r["text"])), set(range(*r["image"]))
    book = [set(range(r["audio"][0] + j * K, r["audio"][0] + (j + 1) * K)) for j in range(C)]
    return {"text": text | {sp["eot"]}, "image": image, "image_end": {sp["eoi"]},
            "frame_start": book[0] | {sp["eoa"]}, "book1": book[1], "book3": book[3],
            "outside": {sp["eos"], sp["bot"], sp["boi"], sp["boa"]}, "done": {sp["pad"], sp["bos"]},
            "unknown": set(range(info["used_size"]))}


def test_masks_each_row_of_a_left_padded_batch_by_its_own_state(tiny):
    proc, info = tiny
    sp, N = info["specials"], info["image"]["tokens_per_image"]
    img, aud0, K = info["ranges"]["image"][0], info["ranges"]["audio"][0], info["audio"]["codebook_size"]
    frame = [aud0 + j * K + 5 for j in range(4)]
    bos, bot, eot, boi, eoi, boa = (sp[n] for n in ("bos", "bot", "eot", "boi", "eoi", "boa"))
    rows = {
        "image_end": [bos, bot, 7, 8, eot, boi, *[img + 3] * N],
        "image": [bos, bot, 7, eot, boi, img + 1, img + 2, img + 3],
        "frame_start": [bos, boa, *frame, *frame],
        "book1": [bos, boi, *[img] * N, eoi, boa, *frame, frame[0]],
        "book3": [bos, boa, *frame[:3]],
        "text": [bos, bot, 9],
        "outside": [bos, boi, *[img] * N, eoi],
        "done": [bos, bot, 4, eot, sp["eos"]],
        "outside_after_bos": [bos],
    }
    want = expected_sets(info)
    want["outside_after_bos"] = want["outside"]
    ids = left_pad(list(rows.values()), sp["pad"])  # most rows start with <pad>s
    V = info["vocab_size"]
    scores = torch.randn(len(rows), V + 8)  # a head wider than the vocabulary
    out = proc(ids, scores.clone())
    for b, name in enumerate(rows):
        allowed = set(torch.nonzero(out[b] > float("-inf")).flatten().tolist())
        assert allowed == want[name], name
        keep = sorted(allowed)
        assert torch.equal(out[b, keep], scores[b, keep]), name
    # two rows alone (another batch size, another call) keep their own states
    two = left_pad([rows["image_end"], rows["book3"]], sp["pad"])
    out2 = proc(two, torch.zeros(2, V))
    assert torch.nonzero(out2[0] == 0).flatten().tolist() == [eoi]
    assert set(torch.nonzero(out2[1] == 0).flatten().tolist()) == want["book3"]
    # a row with no special id yet (unpadded: a <pad> is a marker, after which <bos> is due)
    out1 = proc(torch.tensor([[3, 4, img + 2]]), torch.zeros(1, V))
    assert set(torch.nonzero(out1[0] == 0).flatten().tolist()) == want["unknown"]


def test_a_valid_document_is_never_masked_and_forced_steps_have_one_choice(tiny):
    proc, _ = tiny
    v = proc.vocab
    N = v.cfg.image_tokens
    doc = v.document([v.text_segment([5, 6, 7]), v.image_segment(list(range(N))),
                      v.audio_segment([[1, 2, 3, 4], [5, 6, 7, 8]]), v.text_segment([9])])
    prefixes = [doc[:k] for k in range(1, len(doc))]
    allowed = proc.allowed(left_pad(prefixes, v.pad))
    nxt = torch.tensor(doc[1:])
    assert bool(allowed[torch.arange(len(prefixes)), nxt].all())
    boi_at = doc.index(v.boi)
    assert allowed[boi_at + N].sum().item() == 1  # after the N-th code: <eoi> only
    assert not bool(allowed[:, v.used_size:].any())  # never a padding row


def test_refuses_a_modality_map_megamm_does_not_read_the_same(tiny, tmp_path):
    _, info = tiny
    bad = json.loads(json.dumps(info))
    bad["grammar"]["states"]["IMAGE_END"]["allowed_next"] = [[0, 5]]
    with pytest.raises(ValueError, match="grammar state 4"):
        ModalityGrammarLogitsProcessor.from_modalities(bad)
    bad = json.loads(json.dumps(info))
    bad["specials"]["eoi"] += 1
    with pytest.raises(ValueError, match="specials.eoi"):
        ModalityGrammarLogitsProcessor.from_modalities(bad)
    with pytest.raises(FileNotFoundError):
        ModalityGrammarLogitsProcessor.from_folder(tmp_path)


# ---- stock generate() on the export ---------------------------------------------------------
def test_stock_greedy_image_is_n_codes_then_eoi_and_equals_megamm_greedy(export):
    ours, theirs, hf_dir, toks = export
    v = ours.vocab
    N = v.cfg.image_tokens
    proc = ModalityGrammarLogitsProcessor.from_folder(hf_dir)
    gen = MultimodalGenerator(ours, toks)
    prompts = [gen.prompt([("text", c)], "image") for c in CAPTIONS]
    assert len(prompts[0]) != len(prompts[1])  # the batch is left-padded
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)  # the export's tokenizer builds the same prompt
    assert hf_tok(f"<bos><bot>{CAPTIONS[0]}<eot><boi>").input_ids == prompts[0]
    megamm_ids = gen.generate_batch_ids([[("text", c)] for c in CAPTIONS], "image", Sampling(temperature=0))
    for rows in ([prompts[0]], prompts):
        outs = hf_generate(theirs, rows, v.pad, logits_processor=[proc], max_new_tokens=N + 1)
        for out, mine in zip(outs, megamm_ids):
            assert len(out) == N + 1 and out[-1] == v.eoi
            assert all(v.image_start <= i < v.audio_start for i in out[:-1])
            assert out[:-1] == mine
    assert megamm_ids[0] == sample(ours, prompts[:1], [v.eoi], N + 1, Sampling(temperature=0))[0][:-1]
    raw = hf_generate(theirs, prompts[:1], v.pad, max_new_tokens=N + 1)[0]  # no processor: ungrammatical
    assert v.grammar_violations(prompts[0] + raw).numel() > 0


def test_stock_greedy_audio_is_whole_frames_in_each_codebooks_range(export):
    ours, theirs, hf_dir, toks = export
    v = ours.vocab
    C, K = v.cfg.audio_codebooks, v.cfg.audio_codebook_size
    proc = ModalityGrammarLogitsProcessor.from_folder(hf_dir)
    gen = MultimodalGenerator(ours, toks)
    image = toks.image.decode([[3] * v.cfg.image_tokens])[0]
    prompts = [gen.prompt([("text", CAPTIONS[0])], "audio"), gen.prompt([("image", image)], "audio")]
    limit = 6 * C + 1
    mine = sample(ours, prompts, [v.eoa, v.eos], limit, Sampling(temperature=0))
    outs = hf_generate(theirs, prompts, v.pad, logits_processor=[proc], max_new_tokens=limit,
                       eos_token_id=[v.eoa, v.eos])
    for out, ref in zip(outs, mine):
        stops = [k for k, i in enumerate(out) if i in (v.eoa, v.eos)]
        out = out[: stops[0] + 1] if stops else out  # a finished row goes on with <pad>
        assert out == ref
        if out[-1] == v.eoa:  # <eoa> only at a frame boundary
            codes = out[:-1]
            assert len(codes) % C == 0
        else:
            codes = out
            assert len(out) == limit
        assert len(codes) >= C and v.eoa not in codes
        for k, i in enumerate(codes):
            j = k % C
            assert v.audio_start + j * K <= i < v.audio_start + (j + 1) * K, (k, i)


def test_the_readme_example_draws_an_image(export):
    ours, _, hf_dir, toks = export
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "ModalityGrammarLogitsProcessor" in b]
    assert len(blocks) == 1
    code = blocks[0].replace('HF_DIR = "tiny_hf"', f"HF_DIR = {str(hf_dir)!r}")
    assert code != blocks[0]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102  the README example, verbatim
    v = ours.vocab
    assert ns["out"][0, -1].item() == v.eoi
    image = ns["image"]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    gen = MultimodalGenerator(ours, toks)
    caption = re.search(r"<bot>(.*?)<eot>", code).group(1)
    ids = gen.generate_ids([("text", caption)], "image", 1, Sampling(temperature=0))[0]
    assert (ns["codes"] + v.image_start).tolist() == ids
    assert (gen.decode("image", ids) == image).all()


def test_vocab_round_trips_through_the_exported_map(export):
    ours, _, hf_dir, _ = export
    proc = ModalityGrammarLogitsProcessor.from_folder(hf_dir)
    assert proc.vocab.cfg.layout() == ours.config.vocab.layout()
    assert proc.vocab.size == Vocab(ours.config.vocab).size
