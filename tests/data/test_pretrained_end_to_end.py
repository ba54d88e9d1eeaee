"""End to end with pretrained tokenizers: a manifest of JPEG / PNG / FLAC / WAV files made
here with Pillow and soundfile (an EXIF-rotated JPEG, an RGBA PNG, a float WAV at another
rate among them) is prepared with an HF image tokenizer (JanusVQVAE), an HF audio codec
(MimiModel, 2 of its codebooks) and a text tokenizer of another size than the preset's;
`tiny` trains a few steps on it with the vocabulary taken from the data; tools/generate.py
writes an image and a clip of the right size and rate; the checkpoint copied elsewhere,
with every source folder and cache gone, still generates the same bytes; its steps share
one copy of the tokenizers. ChameleonVQVAE (encode only) prepares data, and a checkpoint
carrying it refuses --to image in one line."""
import importlib.util
import io
import json
import os
import shutil
import sys
from pathlib import Path

import hf_tiny
import numpy as np
import pytest
import soundfile
from PIL import Image

from megamm.checkpoint import manifest
from megamm.tokenizers import TextTokenizer

_spec = importlib.util.spec_from_file_location("convert_checkpoints",
                                              Path(__file__).resolve().parents[1] / "convert" / "checkpoints.py")
_ck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ck)
BASE, run_train, tool = _ck.BASE, _ck.run_train, _ck.tool

CAPTIONS = ["a red two on white", "a blue three on black", "green five", "the yellow seven speaks"]
RATE = hf_tiny.SAMPLE_RATE


def _picture(i, w, h):
    rng = np.random.default_rng(i)
    return np.repeat(np.repeat(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), 8, 0), 8, 1)


def _clip(i, seconds=0.5, rate=RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32)


def write_media(folder):
    """A manifest of 12 lines over JPEG (one EXIF-rotated), RGBA PNG, PNG, FLAC, float WAV."""
    folder.mkdir()
    lines = []
    for i in range(12):
        rec = {"text": CAPTIONS[i % len(CAPTIONS)]}
        if i % 4 == 0:  # a phone photo: stored sideways, EXIF orientation 6 says "turn 90 degrees"
            im = Image.fromarray(_picture(i, 48, 32))
            exif = Image.Exif()
            exif[0x0112] = 6
            im.save(folder / f"{i}.jpg", exif=exif, quality=95)
            rec["image"] = f"{i}.jpg"
        elif i % 4 == 1:
            rgba = np.dstack([_picture(i, 40, 40), np.full((40, 40), 128, np.uint8)])
            Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
            rec["image"] = f"{i}.png"
        else:
            Image.fromarray(_picture(i, 32, 32)).save(folder / f"{i}.png")
            rec["image"] = f"{i}.png"
        if i % 3 == 0:
            soundfile.write(folder / f"{i}.flac", _clip(i), RATE, subtype="PCM_16")
            rec["audio"] = f"{i}.flac"
        elif i % 3 == 1:
            soundfile.write(folder / f"{i}.wav", _clip(i, rate=22050), 22050, subtype="FLOAT")
            rec["audio"] = f"{i}.wav"
        lines.append(json.dumps(rec))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_e2e")
    src = root / "sources"
    src.mkdir()
    hf_tiny.save("JanusVQVAE", src / "janus")
    hf_tiny.save("MimiModel", src / "mimi")
    hf_tiny.save("ChameleonVQVAE", src / "chameleon")
    TextTokenizer.train(CAPTIONS * 5, vocab_size=300, min_frequency=1).save(src / "text")
    man = write_media(root / "media")
    prep = tool("prepare_data.py", man, "--out", root / "data", "--text-tokenizer", src / "text" / "tokenizer.json",
                "--image-tokenizer", src / "janus", "--audio-tokenizer", src / "mimi", "--audio-codebooks", 2,
                "--val-fraction", 0.2, "--seed", 1, "--quiet")
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-3000:]
    run = run_train(["--data", root / "data", *BASE, "--seq-len", 96, "--max-steps", 3, "--ds_config", "cpu.json",
                     "--save-interval", 1, "--keep-last", 2, "--save-dir", root / "run"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return root, prep


def test_the_data_carries_the_pretrained_tokenizers_and_their_vocabulary(world):
    root, prep = world
    meta = json.loads((root / "data" / "meta.json").read_text())
    v = meta["vocab"]
    assert (v["text_size"], v["image_codes"], v["image_tokens"], v["audio_codebooks"], v["audio_codebook_size"]) == \
        (300, 64, 4, 2, 32)
    assert meta["tokenizers"] == "tokenizers"
    info = json.loads((root / "data" / "tokenizers" / "image" / "megamm_tokenizer.json").read_text())
    assert (info["kind"], info["class"], info["image_size"]) == ("hf_image", "JanusVQVAE", 32)
    assert not (root / "data" / ".tokenizers.next").exists()
    assert "resampled audio" in prep.stdout + prep.stderr and "22050 Hz" in prep.stdout + prep.stderr


def test_tiny_trains_on_the_datas_vocabulary(world):
    root, _ = world
    ckpt_meta = json.loads((root / "run" / "step3" / "megamm.json").read_text())
    data_vocab = json.loads((root / "data" / "meta.json").read_text())["vocab"]
    for k in ("text_size", "image_codes", "image_tokens", "audio_codebooks", "audio_codebook_size"):
        assert ckpt_meta["model"]["vocab"][k] == data_vocab[k], k
    assert ckpt_meta["preset"] == "tiny"


def test_the_steps_share_one_copy_of_the_tokenizers(world):
    root, _ = world
    steps = sorted(p.name for p in (root / "run").glob("step*"))
    assert steps == ["step2", "step3"]  # --keep-last 2 pruned step1
    weights = [root / "run" / s / "tokenizers" / "image" / "model" / "model.safetensors" for s in steps]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino
    blobs = [b for b in (root / "run" / ".blobs").iterdir() if not b.name.endswith(".json")]
    assert all(b.stat().st_nlink >= 2 for b in blobs)  # step1's own blobs (none) were pruned, shared ones kept
    for s in steps:
        assert manifest.verify(root / "run" / s) is None


def _tool_main(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", _ck.ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.main


def _generate(ckpt, out, *args, here=True):
    """tools/generate.py in this process (here) or in a fresh one -> the file it wrote."""
    argv = ["--checkpoint", ckpt, *args, "--out", out, "--seed", 3]
    if here:
        assert _tool_main("generate")([str(a) for a in argv]) == 0
    else:
        proc = tool("generate.py", *argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_bytes()


def test_generate_draws_images_and_clips_and_the_checkpoint_travels(world, tmp_path, monkeypatch):
    root, _ = world
    png = _generate(root / "run", tmp_path / "a.png", "--text", "a red two on white", "--to", "image")
    wav = _generate(root / "run", tmp_path / "a.wav", "--text", "green five", "--to", "audio")
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    audio, rate = soundfile.read(io.BytesIO(wav))
    assert rate == RATE and audio.size > 0 and audio.size % 640 == 0  # whole Mimi frames (16 kHz / 25 Hz)
    assert _generate(root / "run", tmp_path / "c.txt", "--image", root / "media" / "0.jpg", "--to", "text")

    # a fresh process, the checkpoint elsewhere, every source folder and cache gone
    away = tmp_path / "elsewhere"
    shutil.copytree(root / "run" / "step3", away)
    moved = {d: d.with_name(d.name + ".gone") for d in (root / "sources", root / "data", root / "run")}
    for a, b in moved.items():
        a.rename(b)
    try:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
        monkeypatch.setenv("MEGAMM_CACHE", str(tmp_path / "empty_cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert _generate(away, tmp_path / "b.png", "--text", "a red two on white", "--to", "image", here=False) == png
        assert _generate(away, tmp_path / "b.wav", "--text", "green five", "--to", "audio", here=False) == wav
    finally:
        for a, b in moved.items():
            b.rename(a)


def test_an_encode_only_image_tokenizer_prepares_data_but_cannot_draw(world, tmp_path, capsys):
    root, _ = world
    rc = _tool_main("prepare_data")([str(a) for a in (
        root / "media" / "manifest.jsonl", "--out", tmp_path / "data", "--image-tokenizer", root / "sources" / "chameleon",
        "--audio-tokenizer", root / "sources" / "mimi", "--audio-codebooks", 2, "--text-tokenizer",
        root / "sources" / "text", "--quiet")])
    assert rc == 0
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["vocab"]["image_tokens"] == 4
    # the same layout as Janus's (64 codes, 2 x 2): give the trained checkpoint Chameleon's tokenizer
    ck = tmp_path / "ck"
    shutil.copytree(root / "run" / "step3", ck)
    shutil.rmtree(ck / "tokenizers" / "image")
    shutil.copytree(tmp_path / "data" / "tokenizers" / "image", ck / "tokenizers" / "image")
    manifest.write(ck, manifest.entries(ck, manifest.list_files(ck)))
    gen = _tool_main("generate")
    capsys.readouterr()
    assert gen([str(a) for a in ("--checkpoint", ck, "--text", "a red two", "--to", "image",
                                 "--out", tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encodes only" in err[0] and "ChameleonVQVAE" in err[0], err
    assert not (tmp_path / "x.png").exists()
    assert gen([str(a) for a in ("--checkpoint", ck, "--image", root / "media" / "2.png", "--to", "text",
                                 "--out", tmp_path / "x.txt")]) == 0


def test_bad_pretrained_inputs_fail_in_one_line(world, tmp_path, capsys):
    root, _ = world
    main = _tool_main("prepare_data")
    man = root / "media" / "manifest.jsonl"
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"model_type": "bert"}))
    tiny_png = root / "media" / "tiny.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny_png)
    bad_man = root / "media" / "with_a_dot.jsonl"
    bad_man.write_text(man.read_text() + json.dumps({"text": "dot", "image": str(tiny_png)}) + "\n")
    cases = [
        (["--image-tokenizer", bogus], "not a known tokenizer class"),
        (["--image-tokenizer", root / "sources" / "mimi"], "audio model"),
        (["--image-tokenizer", root / "sources" / "janus", "--image-size", 48], "must be 32"),
        (["--audio-tokenizer", root / "sources" / "mimi", "--audio-codebooks", 9], "n_codebooks must be in"),
        (["--image-size", 32], "give --image-tokenizer too"),
    ]
    for flags, pattern in cases:
        rc = main([str(a) for a in (man, "--out", tmp_path / "out", *flags, "--quiet")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and pattern in err[0], (flags, err)
        assert not (tmp_path / "out" / "meta.json").exists()
    rc = main([str(a) for a in (bad_man, "--out", tmp_path / "out2", "--image-tokenizer", root / "sources" / "janus",
                                "--audio-tokenizer", root / "sources" / "mimi", "--audio-codebooks", 2, "--quiet")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "line 13" in out.out + out.err and "smaller than the image tokenizer's 2x2 code grid" in out.out + out.err

