"""Tokenizers for the three modalities, and the trained set of the embedded dataset.

    text:  TextTokenizer   encode(str) -> list[int];               decode(list[int]) -> str
    image: ImageTokenizer  encode(uint8 [B, H, W, 3]) -> int64 [B, N]; decode -> uint8 [B, S, S, 3]
    audio: AudioTokenizer  encode(float32 [B, T] @ 16 kHz) -> int64 [B, frames * C] (frame-major);
                           decode -> float32 [B, frames * hop]

Image and audio codes are tokenizer-local (each in [0, codebook_size)); megamm.vocab
maps them into the unified id space. Each tokenizer has `save(dir)` and `load(dir)`.

Backends: megamm's own VQ-VAE and codec (`train`, safetensors + JSON; the embedded
default), or a pretrained transformers model (megamm.tokenizers.pretrained:
HFImageTokenizer over Emu3 / Janus / Chameleon, HFAudioTokenizer over EnCodec / DAC /
Mimi / Xcodec / WavTokenizer). A folder's megamm_tokenizer.json records its kind
("image" / "hf_image", "audio" / "hf_audio") and settings; `Tokenizers.load` rebuilds
whichever it names. The text tokenizer is any HF `tokenizers` tokenizer.json.

The tokenizers of the embedded "spoken coloured digits" dataset are trained and
cached by megamm.demo.recipe (`load_default`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

from megamm.config import ConfigError, VocabConfig
from megamm.tokenizers.audio import AudioCodecConfig, AudioTokenizer, AudioTrainConfig
from megamm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, ImageTrainConfig
from megamm.tokenizers.io import INFO_FILE
from megamm.tokenizers.pretrained import HFAudioTokenizer, HFImageTokenizer, PretrainedTokenizerError
from megamm.tokenizers.text import TextTokenizer

MAX_UNIFIED_IDS = 2**31 - 1
"""Token ids are int32 in the HF export and int64 in torch; the shards store uint32."""
IMAGE_KINDS = {"image": ImageTokenizer, "hf_image": HFImageTokenizer}
AUDIO_KINDS = {"audio": AudioTokenizer, "hf_audio": HFAudioTokenizer}


def kind_of(directory: str | Path) -> str | None:
    """The kind a saved tokenizer folder's megamm_tokenizer.json records, or None."""
    try:
        return json.loads((Path(directory) / INFO_FILE).read_text()).get("kind")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _load_kind(directory: str | Path, kinds: dict, what: str, device):
    """The tokenizer class `kinds` maps the folder's recorded kind to (its first kind,
    megamm's own, for a folder that records none), loaded; pretrained ones on `device`."""
    own = next(iter(kinds))
    kind = kind_of(directory) or own
    if kind not in kinds:
        raise ValueError(f"{Path(directory) / INFO_FILE}: kind {kind!r} is not an {what} tokenizer "
                         f"({', '.join(kinds)})")
    return kinds[kind].load(directory) if kind == own else kinds[kind].load(directory, device)


def load_image_tokenizer(directory: str | Path, device="auto"):
    """ImageTokenizer or HFImageTokenizer, as the folder records."""
    return _load_kind(directory, IMAGE_KINDS, "image", device)


def load_audio_tokenizer(directory: str | Path, device="auto"):
    """AudioTokenizer or HFAudioTokenizer, as the folder records."""
    return _load_kind(directory, AUDIO_KINDS, "audio", device)


class Tokenizers(NamedTuple):
    """The three tokenizers of one dataset; unpacks as `text, image, audio`."""

    text: TextTokenizer
    image: ImageTokenizer | HFImageTokenizer
    audio: AudioTokenizer | HFAudioTokenizer

    def vocab_config(self, n_special: int = 16, pad_multiple: int = 1024) -> VocabConfig:
        """The unified vocabulary these tokenizers fill. Raises ConfigError when it would
        pass MAX_UNIFIED_IDS."""
        used = (self.text.size + n_special + self.image.codebook_size
                + self.audio.n_codebooks * self.audio.codebook_size)
        if used + pad_multiple > MAX_UNIFIED_IDS:
            raise ConfigError(f"the tokenizers need {used} ids (text {self.text.size}, image codebook "
                              f"{self.image.codebook_size}, audio {self.audio.n_codebooks} x "
                              f"{self.audio.codebook_size}), more than the {MAX_UNIFIED_IDS} an int32 id holds: "
                              f"pick fewer audio codebooks or a smaller codebook")
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
        return cls(TextTokenizer.load(directory / "text"), load_image_tokenizer(directory / "image"),
                   load_audio_tokenizer(directory / "audio"))


def compose(out: str | Path, base: str | Path, text: str | Path | None = None, image: str | Path | None = None,
            audio: str | Path | None = None, image_size: int | None = None, audio_bandwidth: float | None = None,
            audio_codebooks: int | None = None) -> Path:
    """A tokenizer folder at `out` (text/, image/, audio/): each part from `base` (a
    tokenizer folder) unless given here: `text` a tokenizer.json file or a folder with one
    (any HF `tokenizers` tokenizer: Llama, Qwen, ...), `image` / `audio` an HF model folder
    (or hub id) of a class in megamm.tokenizers.pretrained, with its settings. Written
    beside `out` and renamed into place, so a failure leaves `out` as it was. Raises
    PretrainedTokenizerError / FileNotFoundError / ValueError with one-line messages."""
    out, base = Path(out), Path(base)
    if image is None and image_size is not None:
        raise PretrainedTokenizerError("--image-size is a setting of a pretrained image tokenizer: give "
                                       "--image-tokenizer too (megamm's own tokenizer keeps the size it was trained at)")
    if audio is None and (audio_bandwidth is not None or audio_codebooks is not None):
        raise PretrainedTokenizerError("--audio-bandwidth / --audio-codebooks are settings of a pretrained audio "
                                       "tokenizer: give --audio-tokenizer too")
    stage = out.with_name(f".{out.name}.partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        parts = {
            "text": TextTokenizer.load(text) if text is not None else None,
            "image": (HFImageTokenizer.from_pretrained(image, image_size=image_size, device="cpu")
                      if image is not None else None),
            "audio": (HFAudioTokenizer.from_pretrained(audio, bandwidth=audio_bandwidth, n_codebooks=audio_codebooks,
                                                       device="cpu") if audio is not None else None),
        }
        loaders = {"text": TextTokenizer.load, "image": load_image_tokenizer, "audio": load_audio_tokenizer}
        for name, tok in parts.items():
            if tok is None:  # from base: copied, and loaded once to check it
                shutil.copytree(base / name, stage / name)
                parts[name] = loaders[name](stage / name)
            else:
                tok.save(stage / name)
        Tokenizers(**parts).vocab_config()  # the vocabulary fits
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


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


__all__ = ["TextTokenizer", "ImageTokenizer", "AudioTokenizer", "HFImageTokenizer", "HFAudioTokenizer",
           "PretrainedTokenizerError", "compose", "kind_of", "load_image_tokenizer", "load_audio_tokenizer", "Tokenizers", "ImageTokenizerConfig",
           "ImageTrainConfig", "AudioCodecConfig", "AudioTrainConfig", "load_for_data", "tokenizers_dir_of"]
