"""Pretrained image and audio tokenizers from `transformers`, behind the interface of
megamm's own (megamm.tokenizers.image.ImageTokenizer / audio.AudioTokenizer).

    image (kind "hf_image"): Emu3VQVAE, JanusVQVAE, ChameleonVQVAE (encode only)
    audio (kind "hf_audio"): EncodecModel, DacModel, MimiModel, XcodecModel, WavTokenizerModel

    HFImageTokenizer.encode(uint8 [B, H, W, 3]) -> int64 [B, N]   N = (S / f)^2, raster order
                     .decode(int [B, N])         -> uint8 [B, S, S, 3]
    HFAudioTokenizer.encode(float32 [B, T])      -> int64 [B, frames * C], frame-major
                     .decode(int [B, frames * C]) -> float32 [B, frames * hop]

S is the tokenizer's `image_size` (a setting of the megamm folder, checked against the
model: S must be a multiple of its downsampling factor f, and for Janus equal to
f x num_patches). Pixels go in as (x / 255 - mean) / std with the HF folder's
preprocessor_config.json image_mean / image_std, or 0.5 / 0.5 (that is [-1, 1], what
all three were trained on) without one; decoded pixels come back the same way. Images
of another size are fitted as megamm.media.read_image_sized fits them (centred square,
Lanczos): that is the folder's `resize` policy, "center_crop_lanczos", the only one.

Audio goes in mono at the model's `sample_rate`, zero-padded to whole frames of `hop`
samples. C, the number of codebooks kept, is a setting: EnCodec and Xcodec take it as a
bandwidth in kbps (`bandwidth`), DAC and Mimi as a number of quantizers (`n_codebooks`);
WavTokenizer has one. Codes of frame t come before those of frame t + 1, codebook 0
first in each frame, as megamm's own codec orders them.

On disk (`save` / `load`): `megamm_tokenizer.json` (kind, HF class, settings) beside
`model/`, the HF model's own `save_pretrained` folder (+ its preprocessor_config.json).
`from_pretrained(path_or_hub_id, ...)` builds one from an HF folder (a hub id works
where the machine has network). Models are frozen, in eval mode, run under no_grad,
batched, on the GPU when one is present (`device="auto"`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from megamm.media import RESIZE_FILTER
from megamm.tokenizers.audio import checked_codes, padded_clips
from megamm.tokenizers.io import read_info, write_info

IMAGE_CLASSES = ("Emu3VQVAE", "JanusVQVAE", "ChameleonVQVAE")
AUDIO_CLASSES = ("EncodecModel", "DacModel", "MimiModel", "XcodecModel", "WavTokenizerModel")
ENCODE_ONLY = ("ChameleonVQVAE",)
MODEL_DIR = "model"
PREPROCESSOR_FILE = "preprocessor_config.json"
RESIZE_POLICY = "center_crop_lanczos"
_CONFIG_CLASS = {  # the HF config class each model loads from (model_type in config.json)
    "emu3_vqgan": "Emu3VQVAE", "janus_vqgan": "JanusVQVAE", "chameleon_vqgan": "ChameleonVQVAE",
    "encodec": "EncodecModel", "dac": "DacModel", "mimi": "MimiModel", "xcodec": "XcodecModel",
    "wavtokenizer": "WavTokenizerModel",
}


class PretrainedTokenizerError(ValueError):
    """An HF folder or setting that cannot make a tokenizer; the message is one line."""


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def hf_class_of(path: str | Path) -> str:
    """The transformers class an HF folder's config.json names (by `architectures`, else
    by `model_type`), or a hub id's config when `path` is no local folder; raises
    PretrainedTokenizerError naming it when it is none of IMAGE_CLASSES + AUDIO_CLASSES."""
    path = Path(path)
    if path.exists():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise PretrainedTokenizerError(f"{path}: no config.json (not a Hugging Face model folder)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PretrainedTokenizerError(f"{cfg_file}: unreadable ({e})") from None
    else:
        from transformers import AutoConfig  # deferred, as in _load_model

        try:
            cfg = AutoConfig.from_pretrained(str(path)).to_dict()
        except (OSError, ValueError) as e:
            raise PretrainedTokenizerError(f"{path}: not a local folder, and not loadable from the hub "
                                           f"({str(e).splitlines()[0]})") from None
    names = [a for a in (cfg.get("architectures") or []) if a in IMAGE_CLASSES + AUDIO_CLASSES]
    if names:
        return names[0]
    name = _CONFIG_CLASS.get(cfg.get("model_type"))
    if name is None:
        known = ", ".join(IMAGE_CLASSES + AUDIO_CLASSES)
        raise PretrainedTokenizerError(
            f"{path}: model_type {cfg.get('model_type')!r} / architectures {cfg.get('architectures')} "
            f"is not a known tokenizer class (known: {known})")
    return name


def _load_model(class_name: str, path: str | Path, device: torch.device):
    import transformers  # deferred: a 2-3 s import that runs with megamm's own tokenizers never pay

    transformers.utils.logging.disable_progress_bar()  # no per-load "Loading weights" bar on stderr
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise PretrainedTokenizerError(f"the installed transformers {transformers.__version__} has no {class_name}")
    try:
        model = cls.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001  a corrupt file surfaces as OSError, SafetensorError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedTokenizerError(f"{path}: cannot load {class_name}: {first}") from None
    model = model.float().to(device).eval()
    model.requires_grad_(False)
    return model


def _save_model(model, directory: Path, source: Path | None) -> None:
    import transformers  # deferred, as in _load_model

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar on stderr
    out = directory / MODEL_DIR
    model.save_pretrained(str(out))
    if source is not None and (source / PREPROCESSOR_FILE).is_file():
        shutil.copyfile(source / PREPROCESSOR_FILE, out / PREPROCESSOR_FILE)


# ---- images -----------------------------------------------------------------------------
class HFImageTokenizer:
    """A pretrained VQ image tokenizer from transformers (see the module doc)."""

    kind = "hf_image"

    def __init__(self, model, class_name: str, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 source: str | None = None):
        if class_name not in IMAGE_CLASSES:
            raise PretrainedTokenizerError(f"{class_name} is not an image tokenizer class ({', '.join(IMAGE_CLASSES)})")
        self.model, self.class_name, self.source = model, class_name, source
        self.image_size = int(image_size)
        self.resize = RESIZE_POLICY
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        cfg = model.config
        self.factor = 2 ** (len(cfg.channel_multiplier) - 1)
        if self.image_size <= 0 or self.image_size % self.factor:
            raise PretrainedTokenizerError(
                f"{class_name}: image_size {self.image_size} is not a multiple of its downsampling factor "
                f"{self.factor}; pick one such as {max(1, round(self.image_size / self.factor)) * self.factor}")
        self.grid = self.image_size // self.factor
        if class_name == "JanusVQVAE" and self.grid != cfg.num_patches:
            raise PretrainedTokenizerError(
                f"JanusVQVAE decodes a {cfg.num_patches}x{cfg.num_patches} grid only: image_size must be "
                f"{cfg.num_patches * self.factor}, got {self.image_size}")
        self._codebook = int(cfg.codebook_size if class_name == "Emu3VQVAE" else cfg.num_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def codebook_size(self) -> int:
        return self._codebook

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def can_decode(self) -> bool:
        return self.class_name not in ENCODE_ONLY

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 `[B, H, W, 3]` -> normalised float `[B, 3, S, S]` (fitted to S as
        megamm.media fits files when the size differs)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3], got shape {list(images.shape)}")
        s = self.image_size
        if images.shape[1:3] != (s, s):
            images = np.stack([np.asarray(ImageOps.fit(Image.fromarray(np.asarray(im, np.uint8)), (s, s),
                                                       method=RESIZE_FILTER)) for im in images])
        x = torch.from_numpy(np.array(images, np.uint8)).permute(0, 3, 1, 2).float() / 255.0  # a copy: may be read-only
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 `[B, H, W, 3]` -> int64 codes `[B, grid * grid]` in [0, codebook_size), raster order."""
        x = self.to_tensor(images)
        b = x.shape[0]
        if self.class_name == "Emu3VQVAE":
            sizes = torch.tensor([[self.image_size, self.image_size]] * b, device=x.device)
            codes = torch.stack(list(self.model.encode(x, sizes).image_tokens))
        else:
            codes = self.model.encode(x).image_tokens
        return codes.reshape(b, -1).cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self, ids) -> np.ndarray:
        """int codes `[B, grid * grid]` -> uint8 images `[B, S, S, 3]`."""
        if not self.can_decode:
            raise ValueError(f"{self.class_name} encodes only (transformers ships no decoder for it): "
                             f"it can prepare data but not draw images; use Emu3VQVAE or JanusVQVAE to generate them")
        codes = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        n = self.tokens_per_image
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"image codes must be [B, {n}], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"image code outside [0, {self.codebook_size})")
        codes = codes.to(self.device)
        if self.class_name == "Emu3VQVAE":
            x = self.model.decode(codes.reshape(-1, self.grid, self.grid))
        else:
            x = self.model.decode(codes)
        x = (x.float().cpu() * self.std + self.mean).clamp(0, 1)
        return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    # ---- files --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, image_size: int | None = None, device="auto") -> "HFImageTokenizer":
        """From an HF folder (or hub id) holding one of IMAGE_CLASSES. `image_size`
        default: the preprocessor's size, else the model's own resolution."""
        name = hf_class_of(path)
        if name not in IMAGE_CLASSES:
            raise PretrainedTokenizerError(f"{path}: {name} is an audio model, not an image tokenizer "
                                           f"({', '.join(IMAGE_CLASSES)})")
        model = _load_model(name, path, _device(device))
        pre = _preprocessor(Path(path))
        if image_size is None:
            image_size = _default_image_size(name, model.config, pre)
        return cls(model, name, image_size, pre.get("image_mean", (0.5,) * 3), pre.get("image_std", (0.5,) * 3),
                   source=str(path))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_model(self.model, directory, None)
        write_info(directory, self.kind, {"class": self.class_name, "image_size": self.image_size,
                                          "resize": self.resize, "mean": self.mean.flatten().tolist(),
                                          "std": self.std.flatten().tolist(), "source": self.source})

    @classmethod
    def load(cls, directory: str | Path, device="auto") -> "HFImageTokenizer":
        directory = Path(directory)
        info = read_info(directory, cls.kind)
        if info.get("resize", RESIZE_POLICY) != RESIZE_POLICY:
            raise PretrainedTokenizerError(f"{directory}: resize policy {info['resize']!r} is not {RESIZE_POLICY!r}")
        model = _load_model(info["class"], directory / MODEL_DIR, _device(device))
        return cls(model, info["class"], info["image_size"], info["mean"], info["std"], info.get("source"))

    def __repr__(self) -> str:
        enc = ", encode only" if not self.can_decode else ""
        return (f"HFImageTokenizer({self.class_name}, {self.image_size}x{self.image_size} -> "
                f"{self.grid}x{self.grid} codes of {self.codebook_size}{enc})")


def _preprocessor(path: Path) -> dict:
    f = path / PREPROCESSOR_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedTokenizerError(f"{f}: unreadable ({e})") from None


def _default_image_size(name: str, cfg, pre: dict) -> int:
    factor = 2 ** (len(cfg.channel_multiplier) - 1)
    if name == "JanusVQVAE":
        return cfg.num_patches * factor
    size = pre.get("size") or pre.get("crop_size") or {}
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or size.get("width")
    if not size and name == "ChameleonVQVAE":
        size = cfg.resolution
    if not size:
        raise PretrainedTokenizerError(f"{name}: give the image size (--image-size); the folder does not say it")
    return int(size) // factor * factor


# ---- audio ------------------------------------------------------------------------------
class HFAudioTokenizer:
    """A pretrained neural audio codec from transformers (see the module doc)."""

    kind = "hf_audio"

    def __init__(self, model, class_name: str, bandwidth: float | None = None, n_codebooks: int | None = None,
                 source: str | None = None):
        if class_name not in AUDIO_CLASSES:
            raise PretrainedTokenizerError(f"{class_name} is not an audio codec class ({', '.join(AUDIO_CLASSES)})")
        self.model, self.class_name, self.source = model, class_name, source
        cfg = model.config
        if class_name in ("EncodecModel", "XcodecModel"):
            if n_codebooks is not None:
                raise PretrainedTokenizerError(f"{class_name} takes a bandwidth (kbps), not a number of codebooks")
            bws = [float(b) for b in cfg.target_bandwidths]
            bandwidth = bws[0] if bandwidth is None else float(bandwidth)
            if bandwidth not in bws:
                raise PretrainedTokenizerError(f"{class_name}: bandwidth {bandwidth:g} kbps is not one of {bws}")
            self.bandwidth = bandwidth
            self._n = int(model.quantizer.get_num_quantizers_for_bandwidth(bandwidth))
        else:
            if bandwidth is not None:
                raise PretrainedTokenizerError(f"{class_name} takes a number of codebooks, not a bandwidth")
            self.bandwidth = None
            full = {"DacModel": lambda: cfg.n_codebooks, "MimiModel": lambda: cfg.num_quantizers,
                    "WavTokenizerModel": lambda: 1}[class_name]()
            n = full if n_codebooks is None else int(n_codebooks)
            if not 1 <= n <= full:
                raise PretrainedTokenizerError(f"{class_name}: n_codebooks must be in [1, {full}], got {n}")
            self._n = n
        self._rate = int(cfg.sample_rate if class_name == "XcodecModel" else cfg.sampling_rate)
        if class_name in ("DacModel", "XcodecModel"):
            self._hop = int(cfg.hop_length)
        elif class_name == "EncodecModel":
            self._hop = int(np.prod(cfg.upsampling_ratios))
        else:
            self._hop = int(round(self._rate / float(cfg.frame_rate)))
        if class_name == "EncodecModel" and cfg.chunk_length is not None:
            raise PretrainedTokenizerError("EncodecModel with chunk_length_s (the 48 kHz models) is not supported: "
                                           "each chunk has its own scale; use a 24 kHz EnCodec")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_codebooks(self) -> int:
        return self._n

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def hop(self) -> int:
        return self._hop

    @property
    def frames_per_second(self) -> float:
        return self._rate / self._hop

    def n_frames(self, n_samples: int) -> int:
        return -(-int(n_samples) // self._hop)

    def hf_codes(self, wave: torch.Tensor) -> torch.Tensor:
        """float `[B, 1, T]` on the model's device -> the HF model's own codes `[B, C, frames]`."""
        m, name = self.model, self.class_name
        if name == "EncodecModel":
            out = m.encode(wave, bandwidth=self.bandwidth)
            return out.audio_codes[0]  # [chunks = 1, B, C, frames]
        if name == "XcodecModel":
            return m.encode(wave, bandwidth=self.bandwidth).audio_codes
        if name == "DacModel":
            return m.encode(wave, n_quantizers=self._n).audio_codes[:, : self._n]
        if name == "MimiModel":
            return m.encode(wave, num_quantizers=self._n).audio_codes
        return m.encode(wave).audio_codes

    def hf_decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The HF model's own decode of codes `[B, C, frames]` -> float `[B, T]`."""
        m, name = self.model, self.class_name
        if name == "EncodecModel":
            y = m.decode(codes[None], [None]).audio_values
        elif name == "DacModel":
            y = m.decode(audio_codes=codes).audio_values
        else:
            y = m.decode(codes).audio_values
        return y.reshape(y.shape[0], -1)

    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> np.ndarray:
        """float32 `[B, T]` at `sample_rate` -> int64 `[B, frames * C]`, frame-major."""
        wave = padded_clips(audio, self._hop)
        codes = self.hf_codes(wave[:, None].to(self.device))  # [B, C, frames']
        return codes.transpose(1, 2).reshape(codes.shape[0], -1).cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self, ids) -> np.ndarray:
        """int `[B, frames * C]` (frame-major) -> float32 `[B, frames * hop]` in [-1, 1]."""
        codes = checked_codes(ids, self._n, self.codebook_size)
        C = self._n
        B, frames = codes.shape[0], codes.shape[1] // C
        if frames == 0:
            return np.zeros((B, 0), np.float32)
        y = self.hf_decode(codes.reshape(B, frames, C).transpose(1, 2).contiguous().to(self.device))
        y = y[:, : frames * self._hop].float().clamp(-1, 1).cpu().numpy()
        if y.shape[1] < frames * self._hop:
            y = np.pad(y, ((0, 0), (0, frames * self._hop - y.shape[1])))
        return y.astype(np.float32)

    # ---- files --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, bandwidth: float | None = None, n_codebooks: int | None = None,
                        device="auto") -> "HFAudioTokenizer":
        name = hf_class_of(path)
        if name not in AUDIO_CLASSES:
            raise PretrainedTokenizerError(f"{path}: {name} is an image model, not an audio codec "
                                           f"({', '.join(AUDIO_CLASSES)})")
        return cls(_load_model(name, path, _device(device)), name, bandwidth, n_codebooks, source=str(path))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_model(self.model, directory, None)
        setting = {"bandwidth": self.bandwidth} if self.bandwidth is not None else {"n_codebooks": self._n}
        write_info(directory, self.kind, {"class": self.class_name, **setting, "source": self.source})

    @classmethod
    def load(cls, directory: str | Path, device="auto") -> "HFAudioTokenizer":
        directory = Path(directory)
        info = read_info(directory, cls.kind)
        model = _load_model(info["class"], directory / MODEL_DIR, _device(device))
        return cls(model, info["class"], info.get("bandwidth"), info.get("n_codebooks"), info.get("source"))

    def __repr__(self) -> str:
        setting = f"{self.bandwidth:g} kbps" if self.bandwidth is not None else f"{self._n} codebooks"
        return (f"HFAudioTokenizer({self.class_name}, {self._rate} Hz, hop {self._hop}, {setting}: "
                f"{self._n} x {self.codebook_size} codes, {self._n * self.frames_per_second:g} tokens/s)")


__all__ = ["HFImageTokenizer", "HFAudioTokenizer", "PretrainedTokenizerError", "hf_class_of", "IMAGE_CLASSES",
           "AUDIO_CLASSES", "ENCODE_ONLY"]
