"""tools/generate.py and tools/evaluate.py on a real (briefly trained) checkpoint of the
embedded dataset, moved to another directory with every cache out of reach."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train_test_helpers", ROOT / "tests" / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)


@pytest.fixture(scope="module")
def moved_checkpoint(quick_data_dir, tmp_path_factory) -> Path:
    """Train 3 steps on the quick default data, then move the save dir elsewhere."""
    base = tmp_path_factory.mktemp("gen")
    ds = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(base / "csv"), "job_name": "run"}
    (base / "ds.json").write_text(json.dumps(ds))
    proc = _train.run_train(["--data", quick_data_dir, "--ds_config", base / "ds.json", "--precision", "fp32",
                             "--seq-len", 512, "--micro-batch", 1, "--max-steps", 3, "--warmup", 1,
                             "--sample-interval", 3, "--save-dir", base / "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = base / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(base / "run"), moved)
    return moved


def test_sample_interval_writes_samples_and_the_monitor_gets_the_metrics(moved_checkpoint):
    from megamm.media import read_image

    samples = moved_checkpoint / "samples"
    grid = read_image(samples / "step3.png")
    assert grid.shape[0] > 28 and grid.shape[1] > 8 * 28  # 8 images in a row, captions under them
    lines = (samples / "step3.txt").read_text().splitlines()
    assert lines[0] == "step 3" and sum(line.startswith("  ") and " | " in line for line in lines) == 16
    assert len(list(samples.glob("step3_audio_*.wav"))) == 2
    csv = moved_checkpoint.parent.parent / "csv" / "run"
    loss = next(csv.glob("*megamm_loss.csv")).read_text().splitlines()
    assert [line.split(",")[0] for line in loss[-3:]] == ["1", "2", "3"]


def tool(name: str, *args, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MEGAMM_CACHE"] = str(cache)  # empty: everything must come from the checkpoint
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_the_checkpoint_carries_its_tokenizers(moved_checkpoint):
    step = moved_checkpoint / (moved_checkpoint / "latest").read_text().strip()
    meta = json.loads((step / "megamm.json").read_text())
    assert meta["tokenizers"] == "tokenizers"
    for kind in ("text", "image", "audio"):
        assert any((step / "tokenizers" / kind).iterdir())
    listed = json.loads((step / "manifest.json").read_text())
    assert any(name.startswith("tokenizers/") for name in json.dumps(listed).split('"'))


def test_generates_every_modality_from_the_moved_checkpoint(moved_checkpoint, tmp_path):
    from megamm.demo.digits import make_split
    from megamm.media import read_image, write_png, write_wav

    empty = tmp_path / "empty-cache"
    empty.mkdir()
    out = tmp_path / "out"
    p = tool("generate.py", "--checkpoint", moved_checkpoint, "--text", "dark green eight on bright cyan",
             "--to", "image", "--num-samples", 2, "--seed", 3, "--cfg", 2.0, "--top-k", 50, "--out", out / "img.png",
             cache=empty)
    assert p.returncode == 0, p.stderr[-3000:]
    for i in range(2):
        img = read_image(out / f"img_{i}.png")
        assert img.shape == (28, 28, 3) and img.dtype == np.uint8

    held = make_split("val", colourings=1, seed=0, start=0, stop=1)
    write_png(tmp_path / "digit.png", held.images[0])
    p = tool("generate.py", "--checkpoint", moved_checkpoint, "--image", tmp_path / "digit.png", "--to", "text",
             "--temperature", 0, "--out", out / "caption.txt", cache=empty)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len((out / "caption.txt").read_text().splitlines()) == 1

    # 8 kHz speech: resampled to the codec's 16 kHz, with a note
    write_wav(tmp_path / "speech.wav", held.audio[0][::2], 8000)
    p = tool("generate.py", "--checkpoint", moved_checkpoint, "--audio", tmp_path / "speech.wav", "--to", "text",
             "--temperature", 0, "--out", out / "words.txt", cache=empty)
    assert p.returncode == 0 and "resampled" in p.stderr, p.stderr[-3000:]

    # image + caption -> audio: a mixed prompt in command-line order
    p = tool("generate.py", "--checkpoint", moved_checkpoint, "--image", tmp_path / "digit.png", "--text",
             held.captions[0], "--to", "audio", "--top-p", 0.9, "--out", out / "speech.wav", cache=empty)
    assert p.returncode == 0, p.stderr[-3000:]
    with wave.open(str(out / "speech.wav")) as w:
        assert w.getframerate() == 16000 and w.getnframes() % 640 == 0  # whole codec frames

    p = tool("generate.py", "--checkpoint", moved_checkpoint, "--unconditional", "--to", "text",
             "--num-samples", 3, "--out", out / "u.txt", cache=empty)
    assert p.returncode == 0 and len((out / "u.txt").read_text().splitlines()) == 3, p.stderr[-3000:]


def test_bad_input_is_one_line(moved_checkpoint, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    c = tmp_path / "cache"
    cases = [
        (["--checkpoint", tmp_path / "nope", "--text", "red one on dark blue", "--to", "image"], "not found"),
        (["--checkpoint", moved_checkpoint, "--image", tmp_path / "bad.png", "--to", "text"], "bad.png"),
        (["--checkpoint", moved_checkpoint, "--image", tmp_path / "missing.png", "--to", "text"], "missing.png"),
        (["--checkpoint", moved_checkpoint, "--text", "  ", "--to", "image"], "empty caption"),
        (["--checkpoint", moved_checkpoint, "--to", "image"], "prompt"),
        (["--checkpoint", moved_checkpoint, "--text", "red one", "--to", "image", "--top-p", 0], "top-p"),
    ]
    for args, words in cases:
        line = one_error_line(tool("generate.py", *args, "--out", tmp_path / "o.png", cache=c))
        assert words in line, (args, line)
    p = tool("generate.py", "--checkpoint", moved_checkpoint, "--text", "x", "--to", "image", "--colour", "red",
             "--out", tmp_path / "o.png", cache=c)
    assert p.returncode == 2 and "unrecognized arguments: --colour" in p.stderr
    assert not (tmp_path / "o.png").exists()
    line = one_error_line(tool("evaluate.py", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "r.json",
                               cache=c))
    assert "not found" in line
    line = one_error_line(tool("evaluate.py", "--checkpoint", moved_checkpoint, "--out", tmp_path / "r.json",
                               "--temperature", -1, cache=c))
    assert "temperature" in line and not (tmp_path / "r.json").exists()


def test_evaluate_writes_the_report_and_pictures(moved_checkpoint, quick_cache, tmp_path):
    p = tool("evaluate.py", "--checkpoint", moved_checkpoint, "--out", tmp_path / "report.json", "--examples", 4,
             "--loss-examples", 8, cache=quick_cache)  # the judges, trained once per session, live in the test cache
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("text_to_image_digit_acc", "text_to_image_color_acc", "image_to_text_exact",
                "text_to_audio_word_acc", "audio_to_text_exact"):
        assert 0.0 <= report[key] <= 1.0, key
    # three steps of training: far from the 512-way uniform (6.24 nats) only a little
    assert 2.0 < report["test_nll_nats_per_dim"] < 8.0
    for key in ("test_loss_text", "test_loss_image", "test_loss_audio"):
        assert np.isfinite(report[key])
    for png in ("report_samples.png", "report_curve.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
