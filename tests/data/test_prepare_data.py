"""tools/prepare_data.py: manifest -> shards. Real held-out examples round-trip
through the shards; bad lines are counted with line numbers; --strict fails in one
line; re-runs are byte-identical."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamm.demo import digits
from megamm.data.documents import DocumentMix, build_document, encode_examples, example_rng, split_document, split_of
from megamm.data.shards import ShardReader, list_shards
from megamm.tokenizers import Tokenizers
from megamm.tokenizers.dsp import mel_distance, psnr_db
from megamm.runtime import torch_threads
from megamm.vocab import Vocab

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_data.py"
N_EXAMPLES = 48


def _load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="session")
def tok_dir(quick_tokenizers_dir) -> Path:
    return quick_tokenizers_dir


@pytest.fixture(scope="session")
def toks(quick_tokenizers) -> Tokenizers:
    return quick_tokenizers


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> Path:
    """Held-out digits as files: .npy images, 16 kHz .wav captions, manifest.jsonl."""
    return digits.export_manifest(tmp_path_factory.mktemp("heldout"), split="val", limit=N_EXAMPLES)


def _run(manifest, out, tok_dir, **kw):
    return tool.prepare(manifest, out, tok_dir, progress=False, **kw)


def _shard_docs(out: Path, split: str) -> list[np.ndarray]:
    docs = []
    for prefix in list_shards(out, split):
        reader = ShardReader(prefix)
        docs += [np.asarray(reader[i], dtype=np.int64) for i in range(len(reader))]
    return docs


def _write_wav(path, audio, rate):
    digits.write_wav(path, audio, rate)


def test_shards_decode_back_to_the_examples(manifest, tok_dir, toks, tmp_path):
    out = tmp_path / "out"
    report = _run(manifest, out, tok_dir, val_fraction=0.25, seed=3)
    assert report.examples == N_EXAMPLES and not report.skipped and not report.repaired
    vocab = Vocab(toks.vocab_config())
    data = digits.make_split("val", colourings=1)
    # the documents every line must have become, computed here without the tool (same
    # encoding batches: a code can flip on a near-tie between different batchings)
    expected = {"train": [], "val": []}
    with torch_threads(1):
        encoded = [enc for s in range(0, N_EXAMPLES, tool.CHUNK)
                   for enc in encode_examples([digits_example(data, i)
                                               for i in range(s, min(s + tool.CHUNK, N_EXAMPLES))], toks)]
    for i, enc in enumerate(encoded):
        line = i + 1
        ids, _ = build_document(enc, vocab, DocumentMix(), example_rng(3, line))
        expected[split_of(3, line, 0.25)].append((i, ids))
    for split in ("train", "val"):
        docs = _shard_docs(out, split)
        assert len(docs) == len(expected[split]) == report.meta["documents"][split]
        for doc, (i, ids) in zip(docs, expected[split]):
            assert doc.tolist() == ids
            assert vocab.grammar_violations(doc).numel() == 0
            # and the segments decode back to the example
            for modality, codes in split_document(doc, vocab):
                if modality == "text":
                    assert toks.text.decode(codes.tolist()) == data.captions[i]
                elif modality == "image":
                    assert psnr_db(data.images[i], toks.image.decode(codes[None])[0]) > 18
                else:
                    wave_out = toks.audio.decode(codes.reshape(1, -1))[0]
                    assert mel_distance(data.audio[i][None], wave_out[None]) < 2.0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab"]["text_size"] == 512 and meta["documents"]["val"] > 0
    assert Tokenizers.load(out / meta["tokenizers"]).text.size == 512  # path relative to the data dir
    assert sum(meta["tokens_per_modality"].values()) == sum(meta["tokens"].values())


def digits_example(data, i):
    from megamm.data.documents import Example

    # the wav holds 16-bit samples: quantise the same way so both sides see equal input
    audio = np.clip(np.rint(data.audio[i].astype(np.float64) * 32767), -32768, 32767) / 32768
    return Example(text=data.captions[i], image=data.images[i], audio=audio.astype(np.float32))


@pytest.fixture
def bad_manifest(manifest, tmp_path) -> Path:
    """The first 6 good lines, then one bad line of each kind, then a good one."""
    base = manifest.parent
    good = manifest.read_text().splitlines()
    (tmp_path / "garbage.npy").write_bytes(b"not an image at all")
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    clip = digits.make_split("val", colourings=1, start=0, stop=1).audio[0]
    _write_wav(tmp_path / "slow.wav", digits_resample(clip, 8000), 8000)
    lines = [_rebase(l, base) for l in good[:6]] + [
        '{"text": "dark red one", "image": ',                                          # 7 bad JSON
        json.dumps({"text": "dark red one", "image": str(base / "images/nope.npy")}),   # 8 missing file
        json.dumps({"text": "dark red one", "image": "garbage.npy"}),                    # 9 unreadable image
        json.dumps({"text": "   ", "image": str(base / "images/00000.npy")}),            # 10 empty caption
        json.dumps({"text": "bright blue two on dark green", "audio": "slow.wav"}),      # 11 8 kHz -> resampled
        json.dumps({"text": "dark red one", "audio": "broken.wav"}),                     # 12 unreadable audio
        json.dumps(["not", "an", "object"]),                                             # 13 not an object
        json.dumps({"caption": "dark red one"}),                                         # 14 unknown key
        _rebase(good[6], base),                                                          # 15 good
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def digits_resample(clip, rate):
    from megamm.tokenizers.dsp import resample

    return resample(clip, 16000, rate)


def _rebase(line, base):
    rec = json.loads(line)
    for k in ("image", "audio"):
        rec[k] = str(base / rec[k])
    return json.dumps(rec)


def test_photos_and_flac_of_a_new_user(toks, tok_dir, tmp_path):
    """A folder a new user brings: a phone photo (JPEG, EXIF-rotated, larger than the
    tokenizer's input), a small PNG, FLAC speech at 22.05 kHz, and a corrupt JPEG and
    FLAC. The good files become examples (upsampling and resampling reported, the line
    kept); each bad one is skipped with one line naming it."""
    import soundfile
    from PIL import Image

    size = toks.image.image_size
    digit = digits.make_split("val", colourings=1, stop=1)
    stored = np.rot90(np.kron(digit.images[0], np.ones((4, 4, 1), np.uint8)), 1)  # 112 x 112, turned
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to display": upright is the digit again
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright, note = tool.load_image(tmp_path / "photo.jpg", size)
    assert upright.shape == (size, size, 3) and note is None
    Image.fromarray(digit.images[0][::2, ::2]).save(tmp_path / "small.png")
    soundfile.write(tmp_path / "speech.flac", digits_resample(digit.audio[0], 22050), 22050)
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "photo.jpg").read_bytes()[:400])
    (tmp_path / "broken.flac").write_bytes(b"fLaC" + bytes(300))
    caption = digit.captions[0]
    lines = [{"text": caption, "image": "photo.jpg"}, {"text": caption, "image": "small.png"},
             {"text": caption, "audio": "speech.flac"}, {"text": caption, "image": "broken.jpg"},
             {"text": caption, "audio": "broken.flac"}]
    manifest = tmp_path / "mine.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = _run(manifest, tmp_path / "out", tok_dir)
    assert report.examples == 3
    skipped = {i.line: i.message for i in report.skipped}
    repaired = {i.line: i.message for i in report.repaired}
    assert sorted(skipped) == [4, 5] and sorted(repaired) == [2, 3]
    assert "unreadable image" in skipped[4] and "broken.jpg" in skipped[4]
    assert "unreadable audio" in skipped[5] and "broken.flac" in skipped[5]
    assert "upsampled image" in repaired[2] and f"14x14 to {size}x{size}" in repaired[2]
    assert "from 22050 Hz to 16000 Hz" in repaired[3]
    assert all("\n" not in m for m in (*skipped.values(), *repaired.values()))
    # the photo reads upright: its pixels are the digit's, not the digit turned
    turned = np.rot90(digit.images[0]).astype(int)
    assert np.abs(upright.astype(int) - digit.images[0]).mean() < 0.3 * np.abs(upright.astype(int) - turned).mean()
    with pytest.raises(tool.BadLine, match=r"missing audio file '.*gone\.wav'"):
        tool.load_audio(tmp_path / "gone.wav", 16000)


def test_bad_lines_are_counted_with_line_numbers(bad_manifest, tok_dir, tmp_path):
    report = _run(bad_manifest, tmp_path / "out", tok_dir)
    skipped = {i.line: i.message for i in report.skipped}
    assert sorted(skipped) == [7, 8, 9, 10, 12, 13, 14]
    assert "bad JSON" in skipped[7]
    assert "missing image file" in skipped[8] and "nope.npy" in skipped[8]
    assert "unreadable image" in skipped[9]
    assert "empty caption" in skipped[10]
    assert "unreadable audio" in skipped[12]
    assert "JSON object" in skipped[13]
    assert "unknown key" in skipped[14]
    assert [i.line for i in report.repaired] == [11] and "8000 Hz" in report.repaired[0].message
    assert report.examples == 8  # lines 1-6, 11 (resampled) and 15
    text = tool.summarise(report)
    assert "skipped 7 line(s)" in text and "line 9:" in text and "repaired 1 line(s)" in text


@pytest.mark.parametrize("line,needle", [(7, "bad JSON"), (8, "missing image file"), (9, "unreadable image"),
                                         (10, "empty caption"), (11, "resampled audio"),
                                         (12, "unreadable audio")])
def test_strict_stops_at_each_kind_of_bad_line(bad_manifest, tok_dir, tmp_path, line, needle):
    lines = bad_manifest.read_text().splitlines()
    only = bad_manifest.with_name(f"only{line}.jsonl")
    only.write_text("\n".join(lines[:6] + [lines[line - 1]]) + "\n")
    with pytest.raises(tool.PrepareError, match=needle) as err:
        _run(only, tmp_path / "out", tok_dir, strict=True)
    assert f":7: " in str(err.value)  # the bad line is line 7 of this manifest
    assert not (tmp_path / "out" / "meta.json").exists()


def test_strict_cli_fails_in_one_line(bad_manifest, tok_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(bad_manifest), "--out", str(tmp_path / "o"),
                           "--tokenizers", str(tok_dir), "--strict", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("prepare_data: error:") and ":7: bad JSON" in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["missing.jsonl"], "manifest not found"),
    (["MANIFEST", "--tokenizers", "/no/such/dir"], "tokenizer directory not found"),
    (["MANIFEST", "--val-fraction", "1.5"], "--val-fraction"),
    (["MANIFEST", "--mix", "text_image=1,bogus=2"], "unknown template"),
    (["MANIFEST", "--workers", "0"], "--workers"),
])
def test_cli_input_errors_are_one_line(manifest, tmp_path, args, needle):
    args = [str(manifest) if a == "MANIFEST" else a for a in args]
    proc = subprocess.run([sys.executable, str(TOOL), *args, "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_empty_and_all_bad_manifests_are_errors(tok_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(tool.PrepareError, match="empty"):
        _run(empty, tmp_path / "out", tok_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n')
    with pytest.raises(tool.PrepareError, match="no usable examples.*line 1: empty caption"):
        _run(bad, tmp_path / "out", tok_dir)


def test_reruns_and_worker_counts_give_identical_bytes(manifest, tok_dir, tmp_path):
    _run(manifest, tmp_path / "a", tok_dir, seed=1, val_fraction=0.2)
    _run(manifest, tmp_path / "a", tok_dir, seed=1, val_fraction=0.2)  # again, into the same dir
    proc = subprocess.run([sys.executable, str(TOOL), str(manifest), "--out", str(tmp_path / "b"),
                           "--tokenizers", str(tok_dir), "--workers", "2", "--seed", "1",
                           "--val-fraction", "0.2", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "examples/s" in proc.stdout and "tokens per modality" in proc.stdout
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["meta.json", "train-00000.bin", "train-00000.idx", "val-00000.bin", "val-00000.idx"]
    for name in names:
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        if name == "meta.json":  # tokenizers path is relative to each output dir; source is the same
            a, b = (json.loads(x) for x in (a, b))
            a.pop("tokenizers"), b.pop("tokenizers")
        assert a == b, name


def test_explicit_split_and_mix(manifest, tok_dir, tmp_path):
    lines = [json.loads(l) for l in manifest.read_text().splitlines()[:10]]
    for rec in lines[:3]:
        rec["split"] = "val"
    pinned = manifest.with_name("pinned.jsonl")
    pinned.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    report = _run(pinned, tmp_path / "out", tok_dir, val_fraction=0.0,
                  mix=DocumentMix.parse("image_text=1", caption_dropout=0.0))
    assert report.meta["documents"] == {"train": 7, "val": 3}
    assert report.meta["templates"] == {"image_text": 10}
    vocab = Vocab(Tokenizers.load(tok_dir).vocab_config())
    for doc in _shard_docs(tmp_path / "out", "train"):
        assert [m for m, _ in split_document(doc, vocab)] == ["image", "text"]


def test_image_only_lines_need_a_fitting_template(manifest, tok_dir, tmp_path):
    rec = json.loads(manifest.read_text().splitlines()[0])
    only_image = tmp_path / "img.jsonl"
    only_image.write_text(json.dumps({"image": str(manifest.parent / rec["image"])}) + "\n")
    report = _run(only_image, tmp_path / "o1", tok_dir, mix=DocumentMix.parse("image=1"))
    assert report.meta["templates"] == {"image": 1}
    with pytest.raises(tool.PrepareError, match="no template"):
        _run(only_image, tmp_path / "o2", tok_dir, strict=True, mix=DocumentMix.parse("text_image=1"))


def test_mix_frequencies_and_caption_dropout(toks):
    from megamm.data.documents import EncodedExample

    vocab = Vocab(toks.vocab_config())
    ex = EncodedExample(text=[1, 2, 3], image=np.arange(vocab.cfg.image_tokens) % vocab.cfg.image_codes,
                        audio=np.zeros((5, 4), np.int64))
    mix = DocumentMix(weights={"text_image": 2.0, "image_text": 1.0, "audio_text": 1.0}, caption_dropout=0.25)
    counts = {}
    for key in range(4000):
        ids, name = build_document(ex, vocab, mix, example_rng(0, key))
        assert vocab.grammar_violations(ids).numel() == 0
        assert [m for m, _ in split_document(ids, vocab)] == name.split("_")
        counts[name] = counts.get(name, 0) + 1
    assert set(counts) == {"text_image", "image", "image_text", "audio_text"}
    # text_image: 2/4 of draws, a quarter of those lose their caption and become "image"
    assert abs(counts["text_image"] / 4000 - 0.375) < 0.03
    assert abs(counts["image"] / 4000 - 0.125) < 0.02
    assert abs(counts["image_text"] / 4000 - 0.25) < 0.03
    # only templates the example can fill are drawn
    text_only = EncodedExample(text=[5])
    assert build_document(text_only, vocab, mix, example_rng(0, 1)) is None
