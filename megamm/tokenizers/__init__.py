"""Tokenizers for the three modalities, and the trained set of the embedded dataset.

    text:  TextTokenizer   encode(str) -> list[int];               decode(list[int]) -> str
    image: ImageTokenizer  encode(uint8 [B, H, W, 3]) -> int64 [B, N]; decode -> uint8 [B, S, S, 3]
    audio: AudioTokenizer  encode(float32 [B, T] @ 16 kHz) -> int64 [B, frames * C] (frame-major);
                           decode -> float32 [B, frames * hop]

Image and audio codes are tokenizer-local (each in [0, codebook_size)); megamm.vocab
maps them into the unified id space. Each tokenizer has `train`, `save(dir)` and
`load(dir)` (safetensors + JSON).

The tokenizers of the embedded "spoken coloured digits" dataset are trained and
cached by megamm.demo.recipe (`load_default`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from megamm.config import VocabConfig
from megamm.tokenizers.audio import AudioCodecConfig, AudioTokenizer, AudioTrainConfig
from megamm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, ImageTrainConfig
from megamm.tokenizers.text import TextTokenizer

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
           "ImageTrainConfig", "AudioCodecConfig", "AudioTrainConfig", "load_for_data", "tokenizers_dir_of"]
