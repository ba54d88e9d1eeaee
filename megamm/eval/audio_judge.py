"""The audio judge: which words a spoken caption says, in order.

    AudioJudge.transcribe([float32 [T] at 16 kHz, ...]) -> ["dark green eight on bright cyan", ...]

A frame classifier, then run-length decoding; no segmentation on silence, so words
that a decoder runs together are still told apart:

    features  the clip scaled to a 0.9 peak (boosted at most 1 / MIN_PEAK-fold, so
              faint noise stays faint), log-mel spectrogram (20 ms hop)
    frames    a 1-D CNN (dilated residual blocks, about +-0.3 s of context) gives each
              frame one of the 19 words of digits.WORDS or silence
    decoding  per-frame probabilities smoothed over `smooth` frames, argmax, runs of
              equal labels; word runs shorter than `min_word_ms` and silences shorter
              than `min_gap_ms` are dropped, equal neighbours merged, silence removed

Training needs no hand labels: every spoken caption of the dataset is its words'
fixed clips joined by silence, so `word_spans` finds each word's exact sample range,
and each frame is labelled by the word under its centre. The judge is trained on the
train split's spoken captions as they are and passed through the audio codec
(decode(encode(x)), same labels: the codec keeps time), decoded again with some codes
replaced by random ones (the damage a model's wrong codes do), plus noise labelled
silence. Random crops, gains, background noise, spectral tilts and masked mel bands
keep it from learning one codec's sound: judges trained for the default tokenizers
still read the quick tokenizers' much rougher round trips (benchmarks/judges.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megamm.data.digits import SAMPLE_RATE, WORDS, load_word_clips, make_split
from megamm.eval.judge_files import load_judge_weights, read_judge_info, save_judge
from megamm.runtime import progress_bar, torch_threads
from megamm.schedule import warmup_cosine
from megamm.tokenizers.dsp import log_mel
from megamm.tokenizers.layers import ResBlock

SILENCE = len(WORDS)
"""Frame class of silence; classes 0..len(WORDS)-1 are the words in WORDS order."""
MIN_PEAK = 0.05
"""Clips are scaled to a 0.9 peak, but as if their peak were at least this."""


@dataclass(frozen=True)
class AudioJudgeConfig:
    n_fft: int = 512
    hop: int = 320
    """Samples per frame (20 ms at 16 kHz)."""
    n_mels: int = 32
    channels: int = 64
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    """One residual block (kernel 5) per entry."""
    smooth: int = 3
    """Frames over which probabilities are averaged before the argmax."""
    min_word_ms: float = 100.0
    """Shorter word runs are dropped (the shortest word clip lasts about 300 ms)."""
    min_gap_ms: float = 60.0
    """Shorter silences are dropped, so a word with a stop closure inside ("magenta"
    holds 38 ms of digital silence) stays one word; the same word said twice with a
    shorter pause is then heard once (captions never repeat a word)."""

    def __post_init__(self):
        object.__setattr__(self, "dilations", tuple(self.dilations))  # JSON gives a list back
        for name in ("n_fft", "hop", "n_mels", "channels", "smooth"):
            if getattr(self, name) < 1:
                raise ValueError(f"audio judge {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class AudioJudgeTrainConfig:
    steps: int = 900
    batch_size: int = 16
    crop_s: float = 2.0
    lr: float = 2e-3
    clips: int = 800
    """Spoken captions of the train split used as they are."""
    roundtrip_clips: int = 400
    """Other spoken captions of the train split, seen through the audio codec: each
    decoded from its codes as they are, and again with some codes replaced."""
    corrupt_max: float = 0.3
    """The second decoding replaces each code by a random one with a probability drawn
    per clip from [0, corrupt_max]: the kind of damage a model's wrong codes do."""
    freq_masks: int = 2
    """Bands of up to 4 mel bins set to the floor at random in each crop's features."""
    eq_db: float = 6.0
    """Each crop's spectrum is tilted by a random smooth curve of up to this many dB,
    so another codec's colouring of the sound does not change the words."""
    noise_clips: int = 32
    """Clips of pure noise (white and low-passed, random levels), all silence."""
    gain_db: tuple[float, float] = (-20.0, 0.0)
    """Random gain of a crop before the judge's own level normalisation."""
    noise_db: tuple[float, float] = (-60.0, -25.0)
    """White noise mixed into half of the crops, relative to full scale."""
    seed: int = 0
    threads: int = 1
    """Intra-op torch threads while training (1: the same result on every machine)."""

    def __post_init__(self):
        object.__setattr__(self, "gain_db", tuple(self.gain_db))
        object.__setattr__(self, "noise_db", tuple(self.noise_db))


class AudioJudgeNet(nn.Module):
    def __init__(self, cfg: AudioJudgeConfig):
        super().__init__()
        c = cfg.channels
        self.net = nn.Sequential(
            nn.Conv1d(cfg.n_mels, c, 5, padding=2),
            *[ResBlock(c, dims=1, kernel=5, dilation=d) for d in cfg.dilations],
            nn.ReLU(), nn.Conv1d(c, len(WORDS) + 1, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """log-mel features `[B, n_mels, frames]` -> logits `[B, frames, classes]`."""
        return self.net(feats).transpose(1, 2)


class AudioJudge:
    kind = "audio_judge"

    def __init__(self, cfg: AudioJudgeConfig = AudioJudgeConfig(), model: AudioJudgeNet | None = None,
                 report: dict | None = None):
        self.cfg = cfg
        self.model = (model or AudioJudgeNet(cfg)).eval()
        self.report = report or {}

    # ---- listening ------------------------------------------------------------------------
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """float `[B, T]` -> `[B, n_mels, T // hop + 1]`: level-normalised log-mel, scaled
        to about [-1, 1] (digital silence is the floor, -1)."""
        peak = wave.abs().amax(1, keepdim=True).clamp(min=MIN_PEAK)
        mel = log_mel(wave * (0.9 / peak), SAMPLE_RATE, self.cfg.n_fft, self.cfg.hop, self.cfg.n_mels)
        return (mel + 11.5) / 11.5 * 2 - 1  # log(1e-5) = -11.5 is log_mel's floor

    @torch.no_grad()
    def frame_probabilities(self, clips: list[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """Per clip, float32 `[frames, len(WORDS) + 1]`: word (WORDS order) and silence
        (last column) probabilities of each frame."""
        out = []
        for i in range(0, len(clips), batch_size):
            chunk = [_as_clip(c) for c in clips[i:i + batch_size]]
            n = max(max(c.size for c in chunk), self.cfg.n_fft)
            wave = torch.from_numpy(np.stack([np.pad(c, (0, n - c.size)) for c in chunk]))  # [B, n]
            probs = self.model(self.features(wave)).softmax(-1).numpy()  # [B, frames, classes]
            out += [probs[b, : c.size // self.cfg.hop + 1] for b, c in enumerate(chunk)]
        return out

    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        """float32 clips `[T_i]` at 16 kHz -> the words heard in each, joined by spaces
        ("" when none)."""
        return [" ".join(self.decode_frames(p)) for p in self.frame_probabilities(clips)]

    def decode_frames(self, probs: np.ndarray) -> list[str]:
        """`[frames, classes]` probabilities -> words: smooth, argmax, keep runs of words
        at least min_word_ms long and of silence at least min_gap_ms long, merge equal
        neighbours, drop silence."""
        k = self.cfg.smooth
        if k > 1 and len(probs):
            padded = np.pad(probs, ((k // 2, k - 1 - k // 2), (0, 0)), mode="edge")
            probs = np.stack([padded[i:i + len(probs)] for i in range(k)]).mean(0)
        labels = probs.argmax(-1)
        frames_per_ms = SAMPLE_RATE / self.cfg.hop / 1000
        min_word, min_gap = self.cfg.min_word_ms * frames_per_ms, self.cfg.min_gap_ms * frames_per_ms
        kept = []
        for label, length in _runs(labels):
            if length >= (min_gap if label == SILENCE else min_word) and (not kept or kept[-1] != label):
                kept.append(label)
        return [WORDS[w] for w in kept if w != SILENCE]

    # ---- training ---------------------------------------------------------------------------
    @classmethod
    def train(cls, clips: list[np.ndarray], frame_labels: list[np.ndarray],
              cfg: AudioJudgeConfig = AudioJudgeConfig(), train: AudioJudgeTrainConfig = AudioJudgeTrainConfig(),
              progress: bool = True) -> "AudioJudge":
        """Fit to float32 `clips` `[T_i]` with per-sample class labels `frame_labels`
        (int `[T_i]`, see `sample_labels`): frame cross-entropy on random crops with
        random gain and background noise, Adam with a cosine schedule. Deterministic for
        the same inputs and seed."""
        if len(clips) != len(frame_labels) or not clips:
            raise ValueError(f"need as many label arrays as clips (at least one), got {len(clips)} clips "
                             f"and {len(frame_labels)} label arrays")
        crop = int(train.crop_s * SAMPLE_RATE) // cfg.hop * cfg.hop
        with torch_threads(train.threads):
            gen = torch.Generator().manual_seed(train.seed)
            rng = np.random.default_rng(train.seed)
            with torch.random.fork_rng():
                torch.manual_seed(train.seed)  # parameter init only; the caller's RNG is untouched
                model = AudioJudgeNet(cfg)
            judge = cls(cfg, model)
            opt = torch.optim.Adam(model.parameters(), lr=train.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, train.steps))
            model.train()
            bar = progress_bar(range(train.steps), "audio judge", progress)
            for step in bar:
                wave, target = _training_batch(clips, frame_labels, crop, cfg.hop, train, rng)
                feats = _augment(judge.features(wave), train, rng)  # [B, n_mels, frames]
                logits = model(feats)  # [B, frames, classes]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            model.eval()
        judge.report = {"steps": train.steps, "final_loss": round(loss.item(), 5),
                        "train_clips": len(clips), "seed": train.seed}
        return judge

    # ---- files ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        save_judge(directory, self.kind, asdict(self.cfg), self.report, self.model)

    @classmethod
    def load(cls, directory: str | Path) -> "AudioJudge":
        info = read_judge_info(directory, cls.kind)
        cfg = AudioJudgeConfig(**info["config"])
        model = AudioJudgeNet(cfg)
        load_judge_weights(directory, model)
        return cls(cfg, model, info.get("report"))

    def __repr__(self) -> str:
        return f"AudioJudge({self.cfg})"


def audio_training_set(audio_tokenizer, train: AudioJudgeTrainConfig = AudioJudgeTrainConfig(),
                       batch_size: int = 32) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(clips, per-sample labels) for `AudioJudge.train`: `clips` spoken captions of the
    train split, `roundtrip_clips` others through `audio_tokenizer` (none without one),
    and `noise_clips` of noise. Captions are spread evenly over the split."""
    data = make_split("train", colourings=1, seed=train.seed)
    words = load_word_clips()
    order = np.random.default_rng(train.seed).permutation(len(data))
    raw_idx = order[: train.clips]
    rt_idx = order[train.clips: train.clips + train.roundtrip_clips] if audio_tokenizer is not None else []
    clips, labels = [], []
    for i in raw_idx:
        clips.append(data.audio[i])
        labels.append(sample_labels(data.audio[i], data.captions[i], words))
    rng = np.random.default_rng([train.seed, 1])
    rt_clips = [data.audio[i] for i in rt_idx]
    with torch_threads(train.threads):
        rt_clips = (roundtrip_audio(audio_tokenizer, rt_clips, batch_size)
                    + roundtrip_audio(audio_tokenizer, rt_clips, batch_size, train.corrupt_max, rng)
                    if rt_clips and train.corrupt_max > 0 else roundtrip_audio(audio_tokenizer, rt_clips, batch_size))
    for i, r in zip(list(rt_idx) * 2, rt_clips):
        clips.append(r)
        labels.append(sample_labels(data.audio[i], data.captions[i], words))
    for k in range(train.noise_clips):
        noise = rng.normal(size=int(rng.uniform(1.0, 3.0) * SAMPLE_RATE))
        if k % 2:  # low-passed ("brown-ish") noise
            noise = np.convolve(noise, np.ones(32) / 32, mode="same")
        noise *= 10 ** (rng.uniform(-40, -5) / 20) / max(np.abs(noise).max(), 1e-9)
        clips.append(noise.astype(np.float32))
        labels.append(np.full(noise.size, SILENCE, np.int64))
    return clips, labels


def roundtrip_audio(audio_tokenizer, clips: list[np.ndarray], batch_size: int = 32, corrupt: float = 0.0,
                    rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """decode(encode(clip)) cut to each clip's length, in zero-padded batches. With
    `corrupt` > 0, each code is first replaced by a random one with a probability drawn
    per clip from [0, corrupt] (by `rng`)."""
    if not clips:
        return []
    out = []
    for i in range(0, len(clips), batch_size):
        chunk = clips[i:i + batch_size]
        n = max(c.size for c in chunk)
        codes = audio_tokenizer.encode(np.stack([np.pad(c, (0, n - c.size)) for c in chunk]))  # [B, frames * C]
        if corrupt > 0:
            p = rng.uniform(0, corrupt, (len(chunk), 1))
            codes = np.where(rng.random(codes.shape) < p,
                             rng.integers(0, audio_tokenizer.codebook_size, codes.shape), codes)
        recon = audio_tokenizer.decode(codes)
        out += [recon[b, : c.size] for b, c in enumerate(chunk)]
    return out


def word_spans(audio: np.ndarray, caption: str, word_clips: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """Sample range [start, stop) of each word of `caption` in `audio`, which must be
    those words' clips joined by silence (digits.speak). Raises ValueError if not."""
    spans, pos = [], 0
    for word in caption.split():
        clip = word_clips[word]
        first = int(np.flatnonzero(clip)[0])  # the clip's first non-zero sample
        sound = np.flatnonzero(audio[pos:])
        start = pos + int(sound[0]) - first if sound.size else -1
        if start < pos or not np.array_equal(audio[start:start + clip.size], clip):
            raise ValueError(f"audio is not the spoken caption {caption!r} (no clip of {word!r} after "
                             f"sample {pos})")
        spans.append((start, start + clip.size))
        pos = start + clip.size
    return spans


def sample_labels(audio: np.ndarray, caption: str, word_clips: dict[str, np.ndarray]) -> np.ndarray:
    """int64 `[T]`: the WORDS index of the word each sample of `audio` belongs to, or
    SILENCE."""
    labels = np.full(audio.size, SILENCE, np.int64)
    for word, (start, stop) in zip(caption.split(), word_spans(audio, caption, word_clips)):
        labels[start:stop] = WORDS.index(word)
    return labels


def _training_batch(clips, labels, crop: int, hop: int, train: AudioJudgeTrainConfig,
                    rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops `[B, crop]` (zero-padded when a clip is shorter) with random gain and
    noise, and the label under each frame's centre `[B, crop // hop + 1]`."""
    waves = np.zeros((train.batch_size, crop), np.float32)
    target = np.full((train.batch_size, crop // hop + 1), SILENCE, np.int64)
    for b in range(train.batch_size):
        i = int(rng.integers(len(clips)))
        start = int(rng.integers(max(clips[i].size - crop, 0) + 1))
        piece = clips[i][start:start + crop]
        waves[b, : piece.size] = piece * 10 ** (rng.uniform(*train.gain_db) / 20)
        centres = start + np.arange(target.shape[1]) * hop
        inside = centres < clips[i].size
        target[b, inside] = labels[i][centres[inside]]
        if rng.random() < 0.5:
            waves[b] += rng.normal(size=crop).astype(np.float32) * 10 ** (rng.uniform(*train.noise_db) / 20)
    return torch.from_numpy(waves), torch.from_numpy(target)


def _augment(feats: torch.Tensor, train: AudioJudgeTrainConfig, rng: np.random.Generator,
             band: int = 4) -> torch.Tensor:
    """Features `[B, n_mels, frames]` with a random smooth tilt per example (sum of three
    random cosines across the mel axis, at most eq_db), and `freq_masks` random bands of
    up to `band` mel bins set to the floor (-1)."""
    B, n_mels, _ = feats.shape
    axis = np.linspace(0, np.pi, n_mels)
    curve = sum(rng.uniform(-1, 1, (B, 1)) * np.cos(k * axis + rng.uniform(0, 2 * np.pi, (B, 1))) for k in (1, 2, 3))
    db_to_feature = np.log(10) / 10 / 11.5 * 2  # features are ln(power) scaled by 2 / 11.5
    curve = curve / 3 * train.eq_db * db_to_feature  # [B, n_mels]
    feats = feats + torch.from_numpy(curve).float()[:, :, None]
    for b in range(B):
        for _ in range(train.freq_masks):
            w = int(rng.integers(0, band + 1))
            lo = int(rng.integers(0, n_mels - w + 1))
            feats[b, lo:lo + w] = -1.0
    return feats


def _runs(labels: np.ndarray):
    """(label, length) of each run of equal values."""
    if not len(labels):
        return
    edges = np.flatnonzero(np.diff(labels)) + 1
    for start, stop in zip(np.r_[0, edges], np.r_[edges, len(labels)]):
        yield int(labels[start]), int(stop - start)


def _as_clip(clip) -> np.ndarray:
    clip = np.asarray(clip, dtype=np.float32)
    if clip.ndim != 1:
        raise ValueError(f"an audio clip must be float32 [T], got shape {list(clip.shape)}")
    return clip
