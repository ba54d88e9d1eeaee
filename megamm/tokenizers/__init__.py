"""Tokenizers for the three modalities, and the trained set of the embedded dataset.

    text:  TextTokenizer   encode(str) -> list[int];               decode(list[int]) -> str
    image: ImageTokenizer  encode(uint8 [B, H, W, 3]) -> int64 [B, N]; decode -> uint8 [B, S, S, 3]
    audio: AudioTokenizer  encode(float32 [B, T] @ 16 kHz) -> int64 [B, frames * C] (frame-major);
                           decode -> float32 [B, frames * hop]

Image and audio codes are tokenizer-local (each in [0, codebook_size)); megamm.vocab
maps them into the unified id space. Each tokenizer has `train`, `save(dir)` and
`load(dir)` (safetensors + JSON).

`load_default()` returns the tokenizers of the embedded "spoken coloured digits"
dataset, trained on its train split on first use and cached under
`$MEGAMM_CACHE` (default `~/.cache/megamm`).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from megamm.config import VocabConfig
from megamm.tokenizers.cache import build_once, cache_root
from megamm.tokenizers.audio import AudioCodecConfig, AudioTokenizer, AudioTrainConfig
from megamm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, ImageTrainConfig
from megamm.tokenizers.text import TextTokenizer
from megamm.tokenizers.training import usable_cores

CACHE_VERSION = 1
"""Bump when a change to the code makes previously cached builds wrong."""


class Tokenizers(NamedTuple):
    """The three tokenizers of one dataset; unpacks as `text, image, audio`."""

    text: TextTokenizer
    image: ImageTokenizer
    audio: AudioTokenizer

    def vocab_config(self, n_special: int = 16, pad_multiple: int = 1024) -> VocabConfig:
        """The unified vocabulary these tokenizers fill."""
        return VocabConfig(text_size=self.text.size, n_special=n_special,
                           image_codes=self.image.codebook_size, image_tokens=self.image.tokens_per_image,
                           audio_codebooks=self.audio.n_codebooks,
                           audio_codebook_size=self.audio.codebook_size, pad_multiple=pad_multiple)

    def save(self, directory: str | Path) -> None:
        """`directory/{text,image,audio}/`."""
        directory = Path(directory)
        self.text.save(directory / "text")
        self.image.save(directory / "image")
        self.audio.save(directory / "audio")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizers":
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        return cls(TextTokenizer.load(directory / "text"), ImageTokenizer.load(directory / "image"),
                   AudioTokenizer.load(directory / "audio"))


@dataclass(frozen=True)
class DefaultTokenizerRecipe:
    """How the default tokenizers are trained; part of their cache key."""

    text_vocab: int = 512
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    image_train: ImageTrainConfig = field(default_factory=ImageTrainConfig)
    audio: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    audio_train: AudioTrainConfig = field(default_factory=AudioTrainConfig)
    colourings: int = 2
    """Colourings per train digit the image tokenizer sees."""
    audio_clips: int = 600
    """Spoken captions (of the train split) the audio codec is trained on."""
    seed: int = 0

    @classmethod
    def quick(cls) -> "DefaultTokenizerRecipe":
        """Small, briefly trained tokenizers (seconds, not minutes) with the default
        vocabulary sizes; for tests and smoke runs."""
        return cls(image=ImageTokenizerConfig(channels=32),
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
    from megamm.data.digits import make_split

    out_dir = Path(out_dir)
    data = make_split("train", colourings=recipe.colourings, seed=recipe.seed)
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
    from megamm.data.digits import make_split

    data = make_split("train", colourings=recipe.colourings, seed=recipe.seed, audio=False)
    ImageTokenizer.train(data.images, recipe.image, recipe.image_train, progress=progress).save(out)


def _train_default_audio(recipe: DefaultTokenizerRecipe, clips, out: Path, progress: bool) -> None:
    AudioTokenizer.train(clips, recipe.audio, recipe.audio_train, progress=progress).save(out)


def tokenizers_dir_of(data_dir: str | Path) -> Path | None:
    """Absolute path of the tokenizers a prepared data directory names in its meta.json
    (stored relative to that directory, or absolute); None if it names none."""
    data_dir = Path(data_dir)
    try:
        tok = json.loads((data_dir / "meta.json").read_text()).get("tokenizers")
    except (OSError, json.JSONDecodeError):
        return None
    return (data_dir / tok).resolve() if tok else None


def load_for_data(data_dir: str | Path) -> Tokenizers:
    """The tokenizers a prepared data directory names in its meta.json."""
    tok = tokenizers_dir_of(data_dir)
    if tok is None:
        raise FileNotFoundError(f"{Path(data_dir) / 'meta.json'} names no tokenizers")
    return Tokenizers.load(tok)


__all__ = ["TextTokenizer", "ImageTokenizer", "AudioTokenizer", "Tokenizers", "ImageTokenizerConfig",
           "ImageTrainConfig", "AudioCodecConfig", "AudioTrainConfig", "DefaultTokenizerRecipe",
           "load_default", "ensure_default_tokenizers", "train_default", "load_for_data", "tokenizers_dir_of",
           "cache_root"]
