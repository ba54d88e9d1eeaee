"""The embedded default dataset, "spoken coloured digits".

Every example is one of the 1,797 handwritten 8x8 digits bundled with scikit-learn
(`sklearn.datasets.load_digits`, no download), upscaled to 28x28 and painted with a
foreground and a background colour, plus a caption that says so and the caption
spoken:

    image    uint8 [28, 28, 3]
    caption  "dark green eight on bright cyan"
    audio    float32 [T] at 16 kHz: the caption's words, each a clip synthesised once
             by espeak-ng (megamm/assets/digit_words.safetensors, made by
             tools/make_speech_clips.py), joined with short silent gaps; every word
             starts on a 40 ms grid (WORD_GRID), the default audio codec's frame

Split: digit samples whose scikit-learn index is a multiple of 10 (180 of them) are
held out (`split="val"`); nothing trained on the "train" split ever sees them, the
tokenizers included. A train digit is painted `colourings` times with different colours
(and, with `shift`, in slightly different places). Everything is a pure function of
(split, colourings, seed, shift): re-runs are identical.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load as load_safetensors

from megamm.media import write_wav

IMAGE_SIZE = 28
SAMPLE_RATE = 16000
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHADES = {"dark": 0.45, "bright": 1.0}
"""Shade name -> factor applied to the colour's full-intensity RGB."""
COLOURS = {
    "red": (235, 35, 35),
    "green": (35, 205, 45),
    "blue": (45, 75, 235),
    "yellow": (240, 220, 35),
    "cyan": (35, 220, 230),
    "magenta": (225, 45, 225),
}
"""Colour name -> RGB at full intensity."""
WORDS = tuple(sorted({*SHADES, *COLOURS, *DIGIT_WORDS, "on"}))
"""Every word a caption can contain (the speech clips cover exactly these)."""
HELD_OUT_EVERY = 10
"""scikit-learn digit samples with index % HELD_OUT_EVERY == 0 form the held-out split."""
WORD_CLIPS_ASSET = "digit_words.safetensors"
WORD_GRID = 640
"""Samples between the possible onsets of a spoken word (40 ms): the frame of the default
audio codec (AudioCodecConfig.hop). A word clip is one fixed waveform, so on this grid it
always encodes to the same code string; with onsets anywhere the codec's frames cut it at a
random phase and one word has many strings (six renditions of one caption: 306 distinct
code frames off the grid, 63 on it). With the grid the README command's spoken words rose
0.57 -> 0.76 (benchmarks/results/main_command-cpu.json)."""

_PAINTS = [(shade, colour) for shade in SHADES for colour in COLOURS]  # 12 paints


@dataclass
class DigitsData:
    """Examples of one split, aligned by position."""

    images: np.ndarray
    """uint8 [N, 28, 28, 3]"""
    captions: list[str]
    digits: np.ndarray
    """int64 [N]: the digit shown"""
    sample_index: np.ndarray
    """int64 [N]: index of the 8x8 source digit in scikit-learn's data"""
    audio: list[np.ndarray] | None
    """N float32 [T_i] clips at 16 kHz, or None when built without audio"""

    def __len__(self) -> int:
        return len(self.captions)


def split_indices(split: str) -> np.ndarray:
    """scikit-learn sample indices of `split` ("train" or "val"), ascending."""
    n = len(_load_sklearn_digits()[1])
    idx = np.arange(n)
    if split == "train":
        return idx[idx % HELD_OUT_EVERY != 0]
    if split == "val":
        return idx[idx % HELD_OUT_EVERY == 0]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def make_split(split: str, colourings: int = 1, seed: int = 0, audio: bool = True,
               start: int = 0, stop: int | None = None, shift: int = 0) -> DigitsData:
    """Examples of `split`: each source digit painted `colourings` times, ordered by
    (digit sample, colouring). `start`/`stop` select a range of that order, identical
    to slicing the whole split (every example is a pure function of its position).
    With `shift` > 0 every colouring but the first also moves the digit by up to `shift`
    pixels along each axis (drawn per example; at most the 2-pixel margin)."""
    if colourings < 1:
        raise ValueError(f"colourings must be >= 1, got {colourings}")
    if not 0 <= shift <= 2:
        raise ValueError(f"shift must be 0, 1 or 2 pixels (the margin), got {shift}")
    gray, labels = _load_sklearn_digits()
    idx = np.repeat(split_indices(split), colourings)  # [N]
    k = np.tile(np.arange(colourings), len(idx) // colourings)
    idx, k = idx[start:stop], k[start:stop]
    fg = np.zeros((len(idx), 3))
    bg = np.zeros((len(idx), 3))
    offsets = np.zeros((len(idx), 2), np.int64)
    captions = []
    for n, (i, j) in enumerate(zip(idx.tolist(), k.tolist())):
        rng = np.random.default_rng([seed, i, j])
        fg_paint, bg_paint = _pick_paints(rng)
        fg[n], bg[n] = paint_rgb(*fg_paint), paint_rgb(*bg_paint)
        captions.append(caption(int(labels[i]), fg_paint, bg_paint))
        if shift and j:
            offsets[n] = np.random.default_rng([seed, i, j, 2]).integers(-shift, shift + 1, size=2)
    images = colourise(gray[idx], fg, bg, offsets=offsets)
    clips = None
    if audio:
        words = load_word_clips()
        clips = [speak(c, words, np.random.default_rng([seed, int(i), int(j), 1]), grid=WORD_GRID)
                 for c, i, j in zip(captions, idx, k)]
    return DigitsData(images=images, captions=captions, digits=labels[idx].astype(np.int64),
                      sample_index=idx.astype(np.int64), audio=clips)


def split_size(split: str, colourings: int = 1) -> int:
    """Number of examples make_split(split, colourings) returns."""
    return len(split_indices(split)) * colourings


def caption(digit: int, fg: tuple[str, str], bg: tuple[str, str]) -> str:
    """caption(8, ("dark", "green"), ("bright", "cyan")) -> "dark green eight on bright cyan"."""
    return f"{fg[0]} {fg[1]} {DIGIT_WORDS[digit]} on {bg[0]} {bg[1]}"


def paint_rgb(shade: str, colour: str) -> np.ndarray:
    return SHADES[shade] * np.asarray(COLOURS[colour], dtype=np.float64)


def colourise(gray: np.ndarray, fg: np.ndarray, bg: np.ndarray, size: int = IMAGE_SIZE,
              offsets: np.ndarray | None = None) -> np.ndarray:
    """8x8 intensities `[N, 8, 8]` (0..16) + RGB `[N, 3]` colours -> uint8 `[N, size, size, 3]`.

    The digit is upscaled (bicubic) to size - 4 and framed by a 2-pixel margin of
    background, like MNIST; each pixel blends background and foreground by intensity.
    `offsets` (int `[N, 2]`, (down, right) pixels within the margin) move each digit.
    """
    alpha = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    alpha = F.interpolate(alpha, size=(size - 4, size - 4), mode="bicubic", align_corners=False)
    alpha = F.pad(alpha.clamp(0.0, 1.0), (2, 2, 2, 2))[:, 0]  # [N, S, S]
    if offsets is not None:
        if np.abs(offsets).max(initial=0) > 2:
            raise ValueError("offsets must stay within the 2-pixel margin")
        for n in np.flatnonzero(np.any(offsets != 0, axis=1)):
            alpha[n] = torch.roll(alpha[n], shifts=tuple(int(o) for o in offsets[n]), dims=(0, 1))
    alpha = alpha[..., None].numpy()  # [N, S, S, 1]
    fg = np.asarray(fg, dtype=np.float32)[:, None, None, :]
    bg = np.asarray(bg, dtype=np.float32)[:, None, None, :]
    return np.clip(np.rint(bg + alpha * (fg - bg)), 0, 255).astype(np.uint8)


def speak(text: str, clips: dict[str, np.ndarray], rng: np.random.Generator | None = None,
          gap_s: tuple[float, float] = (0.04, 0.10), margin_s: float = 0.08, grid: int = 1) -> np.ndarray:
    """Concatenate the word clips of `text` with silent gaps -> float32 `[T]` at 16 kHz.

    Gaps are drawn uniformly from `gap_s` (seconds) with `rng`, or are their midpoint
    without one, then lengthened (by less than `grid` samples) so that every word starts
    at a multiple of `grid` samples; `margin_s` of silence opens and closes the clip.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1 sample, got {grid}")
    words = text.split()
    missing = [w for w in words if w not in clips]
    if missing:
        raise KeyError(f"no speech clip for word(s) {missing}; known: {sorted(clips)}")
    margin = np.zeros(-(-int(margin_s * SAMPLE_RATE) // grid) * grid, np.float32)
    parts, n = [margin], len(margin)
    for k, w in enumerate(words):
        if k:
            g = int((rng.uniform(*gap_s) if rng is not None else sum(gap_s) / 2) * SAMPLE_RATE)
            g += -(n + g) % grid  # the next word starts on the grid
            parts.append(np.zeros(g, np.float32))
            n += g
        parts.append(clips[w])
        n += len(clips[w])
    parts.append(margin)
    return np.concatenate(parts)


def load_word_clips() -> dict[str, np.ndarray]:
    """The shipped word clips: word -> float32 `[T]` at 16 kHz."""
    data = (resources.files("megamm") / "assets" / WORD_CLIPS_ASSET).read_bytes()
    clips = {w: (a.astype(np.float32) / 32768.0) for w, a in load_safetensors(data).items()}
    missing = sorted(set(WORDS) - set(clips))
    if missing:
        raise RuntimeError(f"{WORD_CLIPS_ASSET} lacks words {missing}; rerun tools/make_speech_clips.py")
    return clips


def trim_silence(wave: np.ndarray, threshold: float = 0.02, pad: int = 160) -> np.ndarray:
    """Drop leading/trailing samples quieter than `threshold` x peak, keeping `pad`
    samples of margin on each side (how tools/make_speech_clips.py cuts each word clip)."""
    wave = np.asarray(wave, dtype=np.float32)
    loud = np.nonzero(np.abs(wave) > threshold * max(float(np.abs(wave).max()), 1e-9))[0]
    if loud.size == 0:
        return wave[:0]
    lo = max(int(loud[0]) - pad, 0)
    hi = min(int(loud[-1]) + pad + 1, wave.size)
    return wave[lo:hi]


def _pick_paints(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
    """A foreground and a background paint of different colours."""
    fg = _PAINTS[int(rng.integers(len(_PAINTS)))]
    choices = [p for p in _PAINTS if p[1] != fg[1]]
    return fg, choices[int(rng.integers(len(choices)))]


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(float [1797, 8, 8] intensities 0..16, int [1797] labels), bundled with scikit-learn."""
    # scikit-learn is only the demo's data source: imported here, when digits are first
    # needed, so a training process on other data never carries it (~80 MB of RSS)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def export_manifest(directory: str | Path, split: str = "val", colourings: int = 1, seed: int = 0,
                    limit: int | None = None) -> Path:
    """Write examples of `split` as files plus a manifest tools/prepare_data.py reads:
    `<dir>/manifest.jsonl`, `<dir>/images/NNNNN.npy` (uint8 [28, 28, 3]) and
    `<dir>/audio/NNNNN.wav` (16-bit PCM, 16 kHz). Returns the manifest path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    data = make_split(split, colourings=colourings, seed=seed)
    n = len(data) if limit is None else min(limit, len(data))
    lines = []
    for i in range(n):
        image_rel, audio_rel = f"images/{i:05d}.npy", f"audio/{i:05d}.wav"
        np.save(directory / image_rel, data.images[i], allow_pickle=False)
        write_wav(directory / audio_rel, data.audio[i], SAMPLE_RATE)
        lines.append(json.dumps({"text": data.captions[i], "image": image_rel, "audio": audio_rel}))
    manifest = directory / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
