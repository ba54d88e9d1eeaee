"""tools/train_tokenizer.py: train each kind from a manifest into one tokenizer set
that prepare_data.py can use; bad input gives one line and exit status 2."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamm.demo.digits import export_manifest
from megamm.tokenizers import ImageTokenizer, Tokenizers

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "train_tokenizer.py"


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return export_manifest(tmp_path_factory.mktemp("m"), split="val", limit=24)


def test_trains_a_usable_set(manifest, tmp_path):
    out = tmp_path / "toks"
    for kind, extra in (("text", ["--vocab-size", "300"]), ("image", ["--steps", "3", "--channels", "8"]),
                        ("audio", ["--steps", "2", "--channels", "16", "--batch-size", "2"])):
        proc = _run(kind, manifest, "--out", out, *extra)
        assert proc.returncode == 0, proc.stderr
        assert f"-> {out / kind}" in proc.stdout
    toks = Tokenizers.load(out)
    assert toks.text.size == 300
    assert toks.vocab_config().image_tokens == 49 and toks.vocab_config().audio_codebooks == 4
    caption = json.loads(manifest.read_text().splitlines()[0])["text"]
    assert toks.text.decode(toks.text.encode(caption)) == caption


def test_palette_trains_a_two_tone_image_tokenizer(manifest, tmp_path):
    proc = _run("image", manifest, "--out", tmp_path, "--steps", "3", "--channels", "8", "--palette", "12")
    assert proc.returncode == 0, proc.stderr
    image = ImageTokenizer.load(tmp_path / "image")
    assert image.cfg.palette_codes == 12 and image.tokens_per_image == 51
    codes = image.encode(np.load(manifest.parent / "images" / "00000.npy")[None])
    assert codes.shape == (1, 51) and (codes[0, :2] >= 256 - 12).all() and (codes[0, 2:] < 256 - 12).all()


def test_bad_input_is_one_line(manifest, tmp_path):
    for args, needle in ((["text", tmp_path / "nope.jsonl"], "manifest not found"),
                         (["text", manifest, "--vocab-size", "10"], "vocab_size >= 256"),
                         (["image", manifest, "--steps", "0"], "--steps must be >= 1"),
                         (["image", manifest, "--palette", "255"], "palette_codes must be in [0, codebook_size - 2]")):
        proc = _run(*args, "--out", tmp_path / "o")
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_strict_names_the_bad_line(manifest, tmp_path):
    base = manifest.parent
    recs = [json.loads(line) for line in manifest.read_text().splitlines()[:3]]
    for rec in recs:  # this manifest lives elsewhere: absolute paths
        rec["image"] = str(base / rec["image"])
    recs[2]["image"] = str(base / "images" / "missing.npy")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    proc = _run("image", bad, "--out", tmp_path / "o", "--strict", "--steps", "1", "--channels", "8")
    assert proc.returncode == 2 and ":3: missing image file" in proc.stderr
    lenient = _run("image", bad, "--out", tmp_path / "o", "--steps", "1", "--channels", "8")
    assert lenient.returncode == 0 and "line 3: missing image file" in lenient.stdout
