"""tools/prepare_data.py's other inputs (megamm/data/sources.py): WebDataset tar shards
and Hugging Face datasets (save_to_disk, parquet) give byte for byte the shards that a
manifest over the same media gives; interleaved documents keep their segment order and
one longer than --seq-len is cut between segments and reported; bad samples are skipped
with their position, bad inputs fail in one line; tiny trains on a prepared tar source."""
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from megamm.data.documents import DocumentMix, split_document
from megamm.data.shards import ShardReader, list_shards
from megamm.demo import digits
from megamm.tokenizers.dsp import psnr_db, resample
from megamm.vocab import Vocab

ROOT = Path(__file__).resolve().parents[2]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


tool = _load("prepare_data_sources_tool", ROOT / "tools" / "prepare_data.py")
_ck = _load("convert_checkpoints", ROOT / "tests" / "convert" / "checkpoints.py")
N = 8
SEED, VAL = 1, 0.25


@pytest.fixture(scope="module")
def data():
    return digits.make_split("val", colourings=1, stop=N)


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image, exif_turned=False) -> bytes:
    buf = io.BytesIO()
    if exif_turned:  # stored sideways; EXIF orientation 6 says "turn 90 degrees clockwise"
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(image, 1))).save(buf, format="JPEG", exif=exif, quality=95)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _audio(audio, rate, fmt, subtype=None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _prepare(source, out, tok_dir, **kw):
    kw = {"seed": SEED, "val_fraction": VAL, **kw}
    return tool.prepare(source, out, tok_dir, progress=False, **kw)


def _shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}


def _docs(out: Path, split: str = "train") -> list[np.ndarray]:
    docs = []
    for prefix in list_shards(out, split):
        reader = ShardReader(prefix)
        docs += [np.asarray(reader[i], dtype=np.int64) for i in range(len(reader))]
    return docs


def _manifest(folder: Path, lines: list[dict | str], files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    path = folder / "manifest.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


# ---- WebDataset ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tars(data, tmp_path_factory, quick_tokenizers_dir):
    """Two tar shards written by webdataset.TarWriter (jpg / png, txt / json, flac / wav,
    a sample without a caption, a corrupt jpg) and a manifest over the same media (the
    two bad samples as bad lines), both prepared."""
    import webdataset

    root = tmp_path_factory.mktemp("wds")
    im, au, cap = data.images, data.audio, data.captions
    samples = [  # (key, members, the manifest line of the same media)
        ("a0", {"jpg": _jpeg(im[0], exif_turned=True), "txt": cap[0]}, {"text": cap[0], "image": "a0.jpg"}),
        ("a1", {"png": _png(im[1]), "json": json.dumps({"caption": cap[1], "id": 1})},
         {"text": cap[1], "image": "a1.png"}),
        ("a2", {"wav": _audio(au[2], 16000, "WAV", "PCM_16"), "txt": cap[2]}, {"text": cap[2], "audio": "a2.wav"}),
        ("a3", {"jpg": _jpeg(im[3]), "flac": _audio(au[3], 16000, "FLAC"), "json": json.dumps({"text": cap[3]})},
         {"text": cap[3], "image": "a3.jpg", "audio": "a3.flac"}),
        ("b0", {"png": _png(im[4]), "wav": _audio(resample(au[4], 16000, 22050), 22050, "WAV", "FLOAT"),
                "txt": cap[4]}, {"text": cap[4], "image": "b0.png", "audio": "b0.wav"}),
        ("b1", {"jpg": _jpeg(im[5])}, {"caption": "no caption here"}),
        ("b2", {"jpg": _jpeg(im[6])[:300], "txt": cap[6]}, {"text": cap[6], "image": "b2.jpg"}),
        ("b3", {"png": _png(im[7]), "txt": cap[7], "cls": "7"}, {"text": cap[7], "image": "b3.png"}),
    ]
    files, lines = {}, []
    for shard, group in ((0, samples[:4]), (1, samples[4:])):
        with webdataset.TarWriter(str(root / f"{shard:05d}.tar")) as w:
            for key, members, line in group:
                w.write({"__key__": key, **members})
                lines.append(line)
                files.update({f"{key}.{ext}": (m.encode() if isinstance(m, str) else m)
                              for ext, m in members.items() if ext not in ("txt", "json", "cls")})
    manifest = _manifest(root / "files", lines, files)
    pattern = str(root / "{00000..00001}.tar")
    report = _prepare(tool.open_source(webdataset=pattern), root / "out", quick_tokenizers_dir)
    from_manifest = _prepare(manifest, root / "out_manifest", quick_tokenizers_dir)
    return root, report, from_manifest


def test_webdataset_tars_give_the_shards_of_the_same_manifest(tars):
    root, report, from_manifest = tars
    assert report.examples == from_manifest.examples == 6
    assert _shard_files(root / "out") == _shard_files(root / "out_manifest")
    shard1 = str(root / "00001.tar")
    skipped = {i.where: i.message for i in report.skipped}
    assert sorted(skipped) == [f"{shard1}:b1", f"{shard1}:b2"]
    assert "no caption" in skipped[f"{shard1}:b1"] and f"{shard1}:b1.txt" in skipped[f"{shard1}:b1"]
    assert "unreadable image" in skipped[f"{shard1}:b2"] and "00001.tar:b2.jpg" in skipped[f"{shard1}:b2"]
    assert [i.where for i in report.repaired] == [f"{shard1}:b0"]
    assert "from 22050 Hz to 16000 Hz" in report.repaired[0].message
    assert [i.line for i in from_manifest.skipped] == [6, 7]  # the same records, as manifest lines
    text = tool.summarise(report)
    assert "skipped 2 sample(s):" in text and f"  {shard1}:b1: no caption" in text
    assert all("\n" not in m for m in skipped.values())
    meta = json.loads((root / "out" / "meta.json").read_text())
    assert meta["source"] == str(root / "{00000..00001}.tar") and meta["skipped"] == sorted(skipped)


def test_webdataset_is_read_as_a_stream(tars, tmp_path, quick_tokenizers_dir):
    """The first sample comes before a later shard is opened: a damaged second shard
    only fails the run when it is reached, in one line."""
    root = tars[0]
    (tmp_path / "00001.tar").write_bytes(b"this is not a tar archive" * 40)
    (tmp_path / "00000.tar").write_bytes((root / "00000.tar").read_bytes())
    source = tool.open_source(webdataset=str(tmp_path / "{00000..00001}.tar"))
    first = next(iter(source.records()))
    assert first.key == 1 and first.where.endswith("00000.tar:a0") and first.fields["text"]
    with pytest.raises(tool.PrepareError, match="cannot read") as err:
        _prepare(source, tmp_path / "out", quick_tokenizers_dir)
    assert "00001.tar" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "meta.json").exists()


# ---- Hugging Face datasets ------------------------------------------------------------------
def test_hf_datasets_give_the_shards_of_the_same_manifest(data, tmp_path, quick_tokenizers_dir):
    """save_to_disk with datasets.Image (from PIL images) and datasets.Audio (FLAC bytes)
    under the default column names; parquet with datasets.Image from PNG bytes and raw
    {"array", "sampling_rate"} audio under other names. Row 3 has an empty caption."""
    import datasets

    caps = list(data.captions[:6])
    caps[3] = "  "
    pil = [Image.fromarray(data.images[i]) for i in range(6)]
    flac = [_audio(data.audio[i], 16000, "FLAC") if i % 2 == 0 else None for i in range(6)]
    saved = datasets.Dataset.from_dict(
        {"text": caps, "image": pil, "audio": [{"bytes": b, "path": None} if b else None for b in flac]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image(),
                                    "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}}))
    saved.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "saved"))
    arrays = [{"array": data.audio[i], "sampling_rate": 16000} if i % 3 else None for i in range(6)]
    parquet = datasets.Dataset.from_dict(
        {"caption": caps, "picture": [{"bytes": _png(data.images[i]), "path": None} for i in range(6)],
         "speech": arrays, "label": list(range(6))}).cast_column("picture", datasets.Image())
    parquet.to_parquet(str(tmp_path / "rows.parquet"))

    def lines(audio_name):
        out = []
        for i in range(6):
            line = {"text": caps[i], "image": f"{i}.png"}
            if audio_name(i):
                line["audio"] = audio_name(i)
            out.append(line)
        return out

    pngs = {f"{i}.png": _png(data.images[i]) for i in range(6)}
    m_saved = _manifest(tmp_path / "m1", lines(lambda i: f"{i}.flac" if flac[i] else None),
                        {**pngs, **{f"{i}.flac": b for i, b in enumerate(flac) if b}})
    m_parquet = _manifest(tmp_path / "m2", lines(lambda i: f"{i}.wav" if arrays[i] else None),
                          {**pngs, **{f"{i}.wav": _audio(a["array"], 16000, "WAV", "FLOAT")
                                      for i, a in enumerate(arrays) if a}})
    cases = [(tool.open_source(hf_dataset=str(tmp_path / "saved")), m_saved, "saved"),
             (tool.open_source(hf_dataset=str(tmp_path / "rows.parquet"),
                               columns={"text": "caption", "image": "picture", "audio": "speech"}),
              m_parquet, "rows.parquet")]
    for source, manifest, name in cases:
        report = _prepare(source, tmp_path / f"out_{name}", quick_tokenizers_dir)
        expected = _prepare(manifest, tmp_path / f"man_{name}", quick_tokenizers_dir)
        assert report.examples == expected.examples == 5, name
        assert _shard_files(tmp_path / f"out_{name}") == _shard_files(tmp_path / f"man_{name}"), name
        assert [(i.where, i.message) for i in report.skipped] == [(f"{tmp_path / name}[row 3]", "empty caption")]
        assert "skipped 1 row(s):" in tool.summarise(report)
        meta = json.loads((tmp_path / f"out_{name}" / "meta.json").read_text())
        assert meta["tokens_per_modality"]["audio"] > 0 and meta["skipped"] == [f"{tmp_path / name}[row 3]"]


# ---- interleaved documents ------------------------------------------------------------------
def test_interleaved_documents_keep_their_order_and_long_ones_are_cut(data, tmp_path, quick_tokenizers,
                                                                       quick_tokenizers_dir):
    toks = quick_tokenizers
    vocab = Vocab(toks.vocab_config())
    clip = data.audio[2][:4000]
    files = {f"{i}.png": _png(data.images[i]) for i in range(3)}
    files["c.wav"] = _audio(clip, 16000, "WAV", "FLOAT")
    cap = data.captions
    first = [{"text": cap[0]}, {"image": "0.png"}, {"text": cap[1]}, {"audio": "c.wav"}]
    second = [{"image": "1.png"}, {"text": cap[2]}]
    long = [seg for i in range(6) for seg in ({"text": cap[i % 3]}, {"image": f"{i % 3}.png"})]
    seg_len = {"image": vocab.cfg.image_tokens + 2,
               "audio": toks.audio.encode(clip[None])[0].size + 2}

    def doc_len(segments):
        return 2 + sum(len(toks.text.encode(s["text"])) + 2 if "text" in s else seg_len[next(iter(s))]
                       for s in segments)

    seq_len = max(doc_len(first), doc_len(second))
    assert doc_len(long) > 2 * seq_len - 4  # so it is cut into three or more
    lines = [{"segments": first}, {"segments": second, "split": "train"}, {"segments": long},
             {"segments": [{"text": cap[0]}, {"image": "gone.png"}]},
             {"segments": [{"text": cap[0]}, {"video": "x.mp4"}]},
             {"segments": [{"text": "tiny " * 400}]},
             {"text": cap[1], "image": "1.png"}]
    manifest = _manifest(tmp_path / "m", lines, files)
    report = _prepare(manifest, tmp_path / "out", quick_tokenizers_dir, val_fraction=0.0, seq_len=seq_len,
                      mix=DocumentMix.parse("image_text=1", caption_dropout=0.0))
    skipped = {i.line: i.message for i in report.skipped}
    assert sorted(skipped) == [4, 5]
    assert skipped[4].startswith("segment 2: missing image file") and "gone.png" in skipped[4]
    assert skipped[5].startswith("segment 2: expected")
    assert [(i.line, "segment 1 alone is" in i.message) for i in report.repaired] == [(6, True)]

    docs = [[(m, c) for m, c in split_document(d, vocab)] for d in _docs(tmp_path / "out")]
    kinds = [[m for m, _ in d] for d in docs]
    assert [where for where, _ in report.cut] == ["line 3"]
    n_long = report.cut[0][1]
    assert n_long >= 3
    assert kinds[0] == ["text", "image", "text", "audio"] and kinds[1] == ["image", "text"]
    assert [k for d in kinds[2:2 + n_long] for k in d] == ["text", "image"] * 6
    assert kinds[2 + n_long] == ["text"] and kinds[3 + n_long] == ["image", "text"] and len(docs) == 4 + n_long
    ids = _docs(tmp_path / "out")
    for k in range(n_long):  # each part fits, and is as long as it can be (cut only where it must)
        assert len(ids[2 + k]) <= seq_len
        if k + 1 < n_long:
            nxt = docs[2 + k + 1][0]
            assert len(ids[2 + k]) + nxt[1].size + 2 > seq_len
    texts = [toks.text.decode(c.tolist()) for d in docs[:2 + n_long] for m, c in d if m == "text"]
    assert texts == [cap[0], cap[1], cap[2]] + [cap[i % 3] for i in range(6)]
    images = [c for d in docs[:2] for m, c in d if m == "image"]
    for image, i in zip(images, (0, 1)):
        assert psnr_db(data.images[i], toks.image.decode(image[None])[0]) > 18
    assert docs[0][3][1].shape[1] == toks.audio.n_codebooks and docs[0][3][1].shape[0] > 0
    meta = report.meta
    assert meta["interleaved"] == {"documents": 4, "cut": 1, "seq_len": seq_len}
    assert meta["templates"] == {"interleaved": 3 + n_long, "image_text": 1}
    text = tool.summarise(report)
    assert f"cut 1 of 4 interleaved document(s) longer than --seq-len {seq_len}" in text
    assert f"  line 3: {n_long} documents" in text


# ---- bad inputs -------------------------------------------------------------------------------
def test_bad_inputs_fail_in_one_line(tars, tmp_path, capsys):
    import datasets

    root = tars[0]
    datasets.Dataset.from_dict({"caption": ["a"], "label": [1]}).to_parquet(str(tmp_path / "x.parquet"))
    manifest = root / "files" / "manifest.jsonl"
    capsys.readouterr()  # datasets' progress bar
    cases = [
        (["--hf-dataset", tmp_path / "x.parquet", "--image-column", "img"],
         ["no column 'img' (--image-column)", "its columns: caption, label"]),
        (["--hf-dataset", tmp_path / "x.parquet"], ["no 'text', 'image' or 'audio' column", "caption, label"]),
        (["--hf-dataset", tmp_path / "nowhere"], ["--hf-dataset not found"]),
        ([], ["give exactly one input", "got none"]),
        ([manifest, "--webdataset", root / "{00000..00001}.tar"], ["got MANIFEST and --webdataset"]),
        (["--webdataset", root / "a.tar", "--hf-dataset", tmp_path / "x.parquet"], ["exactly one input"]),
        (["--webdataset", root / "{00000..00003}.tar"], ["webdataset shard not found", "00002.tar (and 1 more of 4)"]),
        ([manifest, "--text-column", "caption"], ["--text-column only go with --hf-dataset"]),
    ]
    for args, needles in cases:
        rc = tool.main([str(a) for a in args] + ["--out", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert err.startswith("prepare_data: error:") and err.strip().count("\n") == 0, err
        for needle in needles:
            assert needle in err, (needle, err)
    assert not (tmp_path / "o" / "meta.json").exists()


# ---- and it trains ------------------------------------------------------------------------------
def test_tiny_trains_on_prepared_tars(tars, tmp_path):
    root = tars[0]
    run = _ck.run_train(["--data", root / "out", *_ck.BASE, "--ds_config", "cpu.json", "--save-dir", tmp_path / "run"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    log = _ck._train.losses(tmp_path / "run")
    assert sorted(log) == [1, 2] and all(np.isfinite(r["loss"]) for r in log.values())
