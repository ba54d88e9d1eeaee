"""The embedded default dataset, built on first use and cached.

`ensure_default_dataset()` returns a data directory launch/train.py can train on
without --data: train/val shards of "spoken coloured digits" documents
(megamm/demo/digits.py) and a meta.json, next to the default tokenizers. The first
call trains the tokenizers (`load_default`, `ensure_default_tokenizers`) and writes
the shards (a few minutes on a laptop CPU, with progress on stderr); later calls
return at once. It uses the same document
code as tools/prepare_data.py (megamm/data/documents.py).

Cache layout under `$MEGAMM_CACHE` (default ~/.cache/megamm):

    tokenizers-<key>/{text,image,audio}/     the default tokenizers
    digits-<key>/train-00000.{bin,idx}, val-00000.{bin,idx}, meta.json

`<key>` hashes the recipe and the shard format version, so a changed recipe or
format builds a new entry instead of reusing a stale one. Every entry is built in a
temporary directory and renamed into place, under a lock, so concurrent ranks and
killed builds are safe.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from megamm.cache import build_once, cache_root
from megamm.data.documents import (DatasetWriter, DocumentMix, EncodedExample, Example, build_document,
                                   encode_examples, example_rng)
from megamm.data.shards import FORMAT_VERSION as SHARD_FORMAT
from megamm.demo.digits import make_split, split_size
from megamm.runtime import progress_bar, torch_threads, usable_cores
from megamm.tokenizers import (AudioCodecConfig, AudioTokenizer, AudioTrainConfig, ImageTokenizer,
                               ImageTokenizerConfig, ImageTrainConfig, TextTokenizer, Tokenizers)
from megamm.vocab import Vocab


CACHE_VERSION = 2
"""Bump when a change to the code makes previously cached builds wrong."""


IMAGE_CODES = ImageTokenizerConfig(codebook_size=64, palette_codes=16)
"""The painted digits are two-tone images in 12 paints: the image tokenizer's two-tone
mode (megamm/tokenizers/image.py), a 16-colour palette and 48 shape codes. Measured on the
held-out digits (benchmarks/results/tokenizers-cpu.json): 48 shape codes reconstruct at
~39 dB and a linear probe reads the digit from them at 0.97; a finer codebook (224 shape
codes: ~41 dB, probe 0.93) made a `tiny` model trained on 240 of them overfit the images
(held-out image loss 3.3 nats/token against 0.6 in training) and draw worse digits."""


@dataclass(frozen=True)
class DefaultTokenizerRecipe:
    """How the default tokenizers are trained; part of their cache key."""

    text_vocab: int = 512
    image: ImageTokenizerConfig = IMAGE_CODES
    image_train: ImageTrainConfig = field(default_factory=ImageTrainConfig)
    audio: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    audio_train: AudioTrainConfig = field(default_factory=AudioTrainConfig)
    colourings: int = 2
    """Colourings per train digit the image tokenizer sees."""
    shift: int = 1
    """make_split's shift: colourings after a digit's first move it by up to this many pixels
    (as in DefaultDatasetRecipe)."""
    audio_clips: int = 600
    """Spoken captions (of the train split) the audio codec is trained on."""
    seed: int = 0

    @classmethod
    def quick(cls) -> "DefaultTokenizerRecipe":
        """Small, briefly trained tokenizers (seconds, not minutes) with the default
        vocabulary sizes; for tests and smoke runs."""
        return cls(image=replace(IMAGE_CODES, channels=32),
                   image_train=ImageTrainConfig(steps=300, batch_size=32),
                   audio=AudioCodecConfig(channels=96),
                   audio_train=AudioTrainConfig(steps=300, batch_size=8, crop_frames=8),
                   colourings=1, audio_clips=300)

    def key(self) -> str:
        """Short hash of the recipe and CACHE_VERSION: the name of its cache entry."""
        blob = json.dumps({"v": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_default(cache_dir: str | Path | None = None, recipe: DefaultTokenizerRecipe | None = None,
                 progress: bool = True) -> Tokenizers:
    """The tokenizers of the embedded dataset: loaded from the cache, or trained on its
    train split (progress on stderr) and cached first. Safe when several processes
    ask at once: one trains, the others wait for it."""
    return Tokenizers.load(ensure_default_tokenizers(cache_dir, recipe, progress))


def ensure_default_tokenizers(cache_dir: str | Path | None = None,
                              recipe: DefaultTokenizerRecipe | None = None, progress: bool = True) -> Path:
    """Directory of the cached default tokenizers (`<cache>/tokenizers-<key>`), trained
    on first use."""
    recipe = recipe or DefaultTokenizerRecipe()
    target = cache_root(cache_dir) / f"tokenizers-{recipe.key()}"
    return build_once(target, lambda tmp: train_default(recipe, tmp, progress),
                      what="the default tokenizers", progress=progress)


def train_default(recipe: DefaultTokenizerRecipe, out_dir: str | Path, progress: bool = True) -> None:
    """Train the three tokenizers on the train split of the embedded dataset and save
    them into `out_dir/{text,image,audio}`. With two usable cores the image VQ-VAE
    trains in a second process while this one trains the audio codec (each single-
    threaded, so the result is the same either way)."""
    out_dir = Path(out_dir)
    data = make_split("train", colourings=recipe.colourings, seed=recipe.seed, shift=recipe.shift)
    if progress:
        print(f"megamm: training tokenizers on {len(data)} spoken coloured digits", file=sys.stderr)
    TextTokenizer.train(data.captions, vocab_size=recipe.text_vocab).save(out_dir / "text")
    step = max(1, len(data.audio) // recipe.audio_clips)
    clips = data.audio[::step][: recipe.audio_clips]
    del data
    if usable_cores() >= 2:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            image_job = pool.submit(_train_default_image, recipe, str(out_dir / "image"), progress)
            _train_default_audio(recipe, clips, out_dir / "audio", progress)
            image_job.result()
    else:
        _train_default_image(recipe, str(out_dir / "image"), progress)
        _train_default_audio(recipe, clips, out_dir / "audio", progress)


def _train_default_image(recipe: DefaultTokenizerRecipe, out: str, progress: bool) -> None:
    data = make_split("train", colourings=recipe.colourings, seed=recipe.seed, audio=False, shift=recipe.shift)
    ImageTokenizer.train(data.images, recipe.image, recipe.image_train, progress=progress).save(out)


def _train_default_audio(recipe: DefaultTokenizerRecipe, clips, out: Path, progress: bool) -> None:
    AudioTokenizer.train(clips, recipe.audio, recipe.audio_train, progress=progress).save(out)


EMBEDDED_MIX = {"text_image": 1.5, "image_text": 2.0, "text_audio": 1.0, "audio_text": 0.25, "image": 1.0,
                "text": 0.0, "audio": 0.0}
"""Template weights of the embedded data set, chosen for `--loss-scope target`, where only
each document's output is learned. An image document is ~60 tokens, a speech one ~300, so
by tokens this is ~40% image documents and ~60% speech: reading digits (image_text) gets
twice the share of DocumentMix's defaults, speech->caption half, caption->speech (whose six
word choices sit among ~280 codes that, on the word grid, are nearly determined) 1.0 rather
than 0.5 (with the digit shift in the same run: spoken words 0.76 -> 0.93, one run each).
Unconditional images (0.2 in the defaults) are where whole images are modelled. Measured in
benchmarks/results/main_command-cpu.json."""


@dataclass(frozen=True)
class DefaultDatasetRecipe:
    """What the default data directory holds; part of its cache key."""

    tokenizers: DefaultTokenizerRecipe = field(default_factory=DefaultTokenizerRecipe)
    colourings: int = 6
    """Documents per train digit (each with its own colours and template)."""
    val_colourings: int = 2
    """Documents per held-out digit."""
    shift: int = 1
    """make_split's shift: a train digit's documents after the first show it moved by up to
    this many pixels, so its six documents are six different code strings, not one (the
    held-out documents too; tools/evaluate.py prompts with unmoved held-out digits). With
    it the held-out image loss fell 2.1 -> 1.4 nats/token and digits drawn rose 0.83 -> 0.93
    (with caption->speech 0.5 -> 1.0 in the same run, one run each)."""
    mix: DocumentMix = field(default_factory=lambda: DocumentMix(weights=EMBEDDED_MIX))
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"tokenizers": self.tokenizers.key(), "shard_format": SHARD_FORMAT, **asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def quick(cls) -> "DefaultDatasetRecipe":
        """A build of well under a minute on a laptop CPU (smaller, briefly trained
        tokenizers; one document per digit) for tests and smoke runs. Same vocabulary
        sizes as the default, lower reconstruction quality."""
        return cls(tokenizers=DefaultTokenizerRecipe.quick(), colourings=1, val_colourings=1)


def ensure_default_dataset(cache_dir: str | Path | None = None, recipe: DefaultDatasetRecipe | None = None,
                           progress: bool = True) -> Path:
    """The data directory of the embedded dataset, built (tokenizers + shards +
    meta.json) on first use. `cache_dir` overrides $MEGAMM_CACHE."""
    recipe = recipe or DefaultDatasetRecipe()
    tok_dir = ensure_default_tokenizers(cache_dir, recipe.tokenizers, progress)
    target = cache_root(cache_dir) / f"digits-{recipe.key()}"
    return build_once(target, lambda tmp: build_default_dataset(tmp, tok_dir, recipe, progress),
                      what="the default dataset", progress=progress)


def build_default_dataset(out: Path, tokenizers_dir: Path, recipe: DefaultDatasetRecipe,
                          progress: bool = True, chunk: int = 256) -> dict:
    """Write the shards and meta.json of the embedded dataset into `out`; returns the meta.

    Examples are encoded in chunks, by a second process too when there are two usable
    cores (single-threaded either way, so the shards are the same)."""
    vocab = Vocab(Tokenizers.load(tokenizers_dir).vocab_config())
    tasks = [(str(tokenizers_dir), split, colourings, recipe.seed, s, s + chunk, recipe.shift)
             for split, colourings in (("train", recipe.colourings), ("val", recipe.val_colourings))
             for s in range(0, split_size(split, colourings), chunk)]
    n_examples = sum(split_size(sp, c) for sp, c in (("train", recipe.colourings), ("val", recipe.val_colourings)))
    writer = DatasetWriter(out, vocab)
    pool = (ProcessPoolExecutor(min(usable_cores(), 4), mp_context=mp.get_context("spawn"))
            if usable_cores() >= 2 else None)
    try:
        results = pool.map(_encode_range, tasks) if pool else map(_encode_range, tasks)
        bar = progress_bar(None, "default dataset", progress, total=n_examples, unit="ex")
        key = 0  # example key across both splits: seeds each example's document choices
        for (_, split, *_), encoded in zip(tasks, results):
            for enc in encoded:
                ids, template = build_document(enc, vocab, recipe.mix, example_rng(recipe.seed, key))
                writer.add(split, ids, template)
                key += 1
            bar.update(len(encoded))
        bar.close()
        meta = writer.close(tokenizers_dir, extra={
            "source": "embedded: spoken coloured digits (scikit-learn 8x8 digits, espeak-ng word clips)",
            "seed": recipe.seed, "mix": recipe.mix.to_dict(), "recipe_key": recipe.key(),
            "colourings": {"train": recipe.colourings, "val": recipe.val_colourings}})
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if progress:
        tpm = ", ".join(f"{k} {v}" for k, v in meta["tokens_per_modality"].items())
        print(f"megamm: default dataset: {meta['documents']['train']} train / {meta['documents']['val']} "
              f"val documents; tokens: {tpm}", file=sys.stderr)
    return meta


def _encode_range(task: tuple) -> list[EncodedExample]:
    """Encode examples [start, stop) of one split (runs in a worker process or inline)."""
    tokenizers_dir, split, colourings, seed, start, stop, shift = task
    with torch_threads(1):
        toks = _load_tokenizers(tokenizers_dir)
        data = make_split(split, colourings=colourings, seed=seed, start=start, stop=stop, shift=shift)
        examples = [Example(text=data.captions[i], image=data.images[i], audio=data.audio[i])
                    for i in range(len(data))]
        return encode_examples(examples, toks)


@lru_cache(maxsize=2)
def _load_tokenizers(directory: str) -> Tokenizers:
    return Tokenizers.load(directory)
