"""A synthetic, grammar-valid, learnable corpus for tests and smoke runs.

Each document mixes segments whose content depends on a hidden "class" (0..9): the
text segment names it, the image codes and audio frames are noisy functions of it, so
a model can learn cross-modal structure and its loss falls quickly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megamm.config import VocabConfig
from megamm.data.shards import ShardWriter
from megamm.vocab import Vocab


def synthetic_document(vocab: Vocab, rng: np.random.Generator) -> list[int]:
    cfg = vocab.cfg
    cls = int(rng.integers(10))
    text = [(cls * 7 + j) % cfg.text_size for j in range(3)]
    img = (np.arange(cfg.image_tokens) * (cls + 1) + cls) % cfg.image_codes
    noise = rng.random(cfg.image_tokens) < 0.1
    img = np.where(noise, rng.integers(cfg.image_codes, size=cfg.image_tokens), img)
    frames = int(rng.integers(2, 6))
    audio = (np.arange(frames * cfg.audio_codebooks).reshape(frames, -1) + 3 * cls) % cfg.audio_codebook_size
    segments = [vocab.text_segment(text), vocab.image_segment(img), vocab.audio_segment(audio)]
    if rng.random() < 0.5:  # seed 001's two orderings, 50/50
        segments = [segments[1], segments[0], segments[2]]
    return vocab.document(segments)


def write_synthetic_dataset(out_dir, vocab_cfg: VocabConfig, n_train: int = 512, n_val: int = 64,
                            seed: int = 0) -> Path:
    """Write `train`/`val` shards and meta.json of synthetic documents into out_dir."""
    out = Path(out_dir)
    vocab = Vocab(vocab_cfg)
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        with ShardWriter(out / f"{split}_00000", vocab.used_size) as w:
            for _ in range(n):
                w.add_document(synthetic_document(vocab, rng))
        counts[split] = n
    meta = {"vocab": vocab_cfg.__dict__, "tokenizers": None, "source": "synthetic",
            "documents": counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out
