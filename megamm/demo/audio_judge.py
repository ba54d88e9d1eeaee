"""The audio judge: which words a spoken caption says, in order.

    AudioJudge.transcribe([float32 [T] at 16 kHz, ...]) -> ["dark green eight on bright cyan", ...]

A frame classifier, then a best path with minimum durations; no segmentation on
silence, so words that a decoder runs together are still told apart:

    features  the clip scaled to a 0.9 peak (as if its peak were at least MIN_PEAK,
              so faint noise stays faint), log-mel spectrogram (20 ms hop)
    frames    a 1-D CNN (dilated residual blocks, about +-0.3 s of context) gives each
              frame one of the 19 words of digits.WORDS or silence
    decoding  the labelling of the frames with the highest total log-probability in
              which every word lasts at least `min_word_ms` and every silence at least
              `min_gap_ms` (Viterbi over (class, frames so far) states); its runs,
              silence removed, are the words. A short stretch that sounds like another
              word (the onset of "blue" like "red", after a rough codec) is outvoted
              by the word around it instead of becoming a word of its own.

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

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megamm.demo.digits import SAMPLE_RATE, WORDS, load_word_clips, make_split
from megamm.demo.judge_files import load_judge_weights, read_judge_info, save_judge
from megamm.runtime import progress_bar, torch_threads
from megamm.schedule import warmup_cosine
from megamm.tokenizers.dsp import log_mel
from megamm.tokenizers.layers import ResBlock

SILENCE = len(WORDS)
"""Frame class of silence; classes 0..len(WORDS)-1 are the words in WORDS order."""
MIN_PEAK = 0.05
"""Clips are scaled to a 0.9 peak, but as if their peak were at least this."""
_LOG_FLOOR = math.log(1e-5)
"""log_mel's floor (digital silence); features map it to -1."""


@dataclass(frozen=True)
class AudioJudgeConfig:
    n_fft: int = 512
    hop: int = 320
    """Samples per frame (20 ms at 16 kHz)."""
    n_mels: int = 32
    channels: int = 64
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    """One residual block (kernel 5) per entry."""
    min_word_ms: float = 200.0
    """Shortest word the decoder accepts (the shortest word clip lasts 295 ms)."""
    min_gap_ms: float = 60.0
    """Shortest silence the decoder accepts, so a word with a stop closure inside
    ("magenta" holds 38 ms of digital silence) stays one word; the same word said twice
    with a shorter pause is then heard once (captions never repeat a word)."""

    def __post_init__(self):
        object.__setattr__(self, "dilations", tuple(self.dilations))  # JSON gives a list back
        for name in ("n_fft", "hop", "n_mels", "channels"):
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
        """float `[B, T]` -> `[B, n_mels, T // hop + 1]`: level-normalised log-mel power,
        mapped linearly from [ln 1e-5, 0] to [-1, 1] (digital silence is -1; the loudest
        bins of speech reach about 2)."""
        peak = wave.abs().amax(1, keepdim=True).clamp(min=MIN_PEAK)
        mel = log_mel(wave * (0.9 / peak), SAMPLE_RATE, self.cfg.n_fft, self.cfg.hop, self.cfg.n_mels)
        return 1 - 2 * mel / _LOG_FLOOR

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
        """`[frames, classes]` probabilities -> the words of the best labelling with
        minimum durations (`min_duration_path`)."""
        if not len(probs):
            return []
        frames_per_ms = SAMPLE_RATE / self.cfg.hop / 1000
        min_frames = np.full(probs.shape[1], round(self.cfg.min_word_ms * frames_per_ms))
        min_frames[SILENCE] = round(self.cfg.min_gap_ms * frames_per_ms)
        path = min_duration_path(np.log(np.maximum(probs, 1e-12)), min_frames)
        return [WORDS[label] for label, _ in _runs(path) if label != SILENCE]

    # ---- training ---------------------------------------------------------------------------
    @classmethod
    def train(cls, clips: list[np.ndarray], labels: list[np.ndarray],
              cfg: AudioJudgeConfig = AudioJudgeConfig(), train: AudioJudgeTrainConfig = AudioJudgeTrainConfig(),
              progress: bool = True) -> "AudioJudge":
        """Fit to float32 `clips` `[T_i]` with per-sample class labels `labels` (int
        `[T_i]`, see `sample_labels`): frame cross-entropy on random crops with random
        gain, background noise, spectral tilt and masked bands; Adam with a cosine
        schedule. Deterministic for the same inputs and seed."""
        if len(clips) != len(labels) or not clips:
            raise ValueError(f"need as many label arrays as clips (at least one), got {len(clips)} clips "
                             f"and {len(labels)} label arrays")
        crop = int(train.crop_s * SAMPLE_RATE) // cfg.hop * cfg.hop
        with torch_threads(train.threads):
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
                wave, target = _training_batch(clips, labels, crop, cfg.hop, train, rng)
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
    each decoded as encoded and again with corrupted codes (unless corrupt_max is 0),
    and `noise_clips` of noise. The captions are drawn at random from the split."""
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


def min_duration_path(log_probs: np.ndarray, min_frames: np.ndarray) -> np.ndarray:
    """The labelling `[T]` of frames with log-probabilities `[T, C]` that maximises their
    sum, among those in which every run of class c lasts at least `min_frames[c]` frames
    (the first run excepted, so a clip may start mid-word).

    Viterbi over the states (c, d): class c for d frames so far, d capped at
    min_frames[c] ("complete"). A frame either extends the run ((c, d) -> (c, d + 1),
    or stays at the cap) or, from a complete state, starts a run of another class at
    (c', 1). The path ends in a complete state. O(T x sum(min_frames)).
    """
    T, C = log_probs.shape
    min_frames = np.maximum(np.asarray(min_frames, np.int64), 1)  # [C]
    cls = np.repeat(np.arange(C), min_frames)  # [S] class of each state
    dur = np.arange(len(cls)) - np.r_[0, np.cumsum(min_frames)[:-1]][cls] + 1  # [S] 1 .. min_frames[c]
    states = np.arange(len(cls))
    complete = dur == min_frames[cls]  # [S]
    complete_idx = np.flatnonzero(complete)  # [C]: the complete state of each class
    chain_prev = np.maximum(states - 1, 0)  # (c, d - 1), used where d > 1
    score = np.where(complete, log_probs[0, cls], -np.inf)  # [S]
    back = np.zeros((T, len(cls)), np.int64)
    for t in range(1, T):
        done = score[complete_idx]  # [C]
        top = np.argsort(done)[::-1][:2]
        other = np.where(np.arange(C) == top[0], top[-1], top[0])  # [C] best class other than c
        cand = np.stack([np.where(dur > 1, score[chain_prev], -np.inf),  # extend the run
                         np.where(complete, score, -np.inf),  # stay at the cap
                         np.where(dur == 1, done[other[cls]], -np.inf)])  # start a new run
        src = np.stack([chain_prev, states, complete_idx[other[cls]]])  # [3, S]
        k = cand.argmax(0)  # [S]
        score = cand[k, states] + log_probs[t, cls]
        back[t] = src[k, states]
    s = complete_idx[np.argmax(score[complete_idx])]
    path = np.empty(T, np.int64)
    for t in range(T - 1, -1, -1):
        path[t] = cls[s]
        s = back[t, s]
    return path


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
    db_to_feature = math.log(10) / 10 * 2 / -_LOG_FLOOR  # dB -> ln(power) -> feature units
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
    return np.nan_to_num(clip, nan=0.0, posinf=1.0, neginf=-1.0)
