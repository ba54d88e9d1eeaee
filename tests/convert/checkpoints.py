"""Tiny checkpoints of several layouts for the converter tests, made by real
`deepspeed` launches of launch/train.py (through tests/train's run_train helper,
loaded by path so its module name cannot clash with another conftest)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from megamm.config import get_preset
from megamm.demo.recipe import IMAGE_CODES
from megamm.data.synthetic import write_synthetic_dataset
from megamm.tokenizers import AudioTokenizer, ImageTokenizer, TextTokenizer
from megamm.tokenizers.audio import AudioCodecConfig

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train_test_helpers", ROOT / "tests" / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)
run_train = _train.run_train
run_many = _train.run_many

TEXTS = ["the red digit seven is spoken slowly", "a blue three and a green five",
         "hello world, this is megamm", "numbers: one two three four five six seven eight nine zero"] * 8

LOGGED_SEED = 3
BASE = ["--seq-len", 64, "--warmup", 1, "--seed", LOGGED_SEED, "--lr", 3e-3, "--max-steps", 2, "--precision", "fp32",
        "--micro-batch", 1, "--grad-accum", 1]
# name -> (flags, ranks); every layout keeps the tiny preset
LAYOUTS = {
    "tp2": (["--ds_config", "zero1.json", "--tp", 2], 2),
    "pp2": (["--ds_config", "zero1_3d.json", "--pp", 2], 2),
    "zero3": (["--ds_config", "zero3_offload.json"], 2),
}


def write_tokenizers(directory: Path) -> Path:
    """A small trained text BPE and (untrained) image and audio tokenizers of the tiny
    vocabulary's sizes: real tokenizer folders for the export to carry."""
    text = TextTokenizer.train(TEXTS, vocab_size=get_preset("tiny").vocab.text_size, min_frequency=1)
    text.save(directory / "text")
    ImageTokenizer(IMAGE_CODES).save(directory / "image")  # the embedded data's, which the tiny vocabulary fits
    AudioTokenizer(AudioCodecConfig()).save(directory / "audio")
    return directory


def write_data(directory: Path) -> Path:
    """Synthetic tiny-vocabulary shards whose meta.json names tokenizers."""
    data = write_synthetic_dataset(directory / "data", get_preset("tiny").vocab, n_train=200, n_val=20, seed=0)
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizers"] = str(write_tokenizers(directory / "tokenizers"))
    (data / "meta.json").write_text(json.dumps(meta))
    return data


def train(data: Path, save_dir: Path, layout: str, extra=()) -> Path:
    flags, ranks = LAYOUTS[layout]
    proc = run_train(["--data", data, *BASE, *flags, *extra, "--save-dir", save_dir], ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return save_dir


def train_all(data: Path, root: Path, layouts) -> dict[str, Path]:
    """train() for several layouts, sharing one launch per world size; layout -> save dir."""
    run_many({layout: (["--data", data, *BASE, *LAYOUTS[layout][0], "--save-dir", root / layout], LAYOUTS[layout][1])
              for layout in layouts}, root)
    return {layout: root / layout for layout in layouts}


def tool(name: str, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def single_document(vocab, seed: int, length: int) -> list[int]:
    """One synthetic document (a single <bos>, so HF's plain causal attention and
    megamm's per-document attention see the same thing), cut to `length` ids."""
    from megamm.data.synthetic import synthetic_document

    doc = synthetic_document(vocab, np.random.default_rng(seed))
    while len(doc) < length:
        doc = doc[:-1] + synthetic_document(vocab, np.random.default_rng(seed + len(doc)))[1:]
    return doc[:length]
