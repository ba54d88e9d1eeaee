"""Audio tokenizer: a small convolutional codec with residual vector quantisation.

    encode: float32 [B, T] at 16 kHz  -> int64 [B, frames * C]
    decode: int64 [B, frames * C]     -> float32 [B, frames * hop]

One frame covers `hop` samples (640 by default: 25 frames/s) and is described by C
codes (4 by default), one per residual codebook, each in [0, codebook_size). The
flat layout is frame-major:

    [f0c0, f0c1, f0c2, f0c3, f1c0, f1c1, ...]      i.e. codes[B, frames, C].reshape(B, -1)

so 25 frames/s x 4 codebooks = 100 tokens per second. These are tokenizer-local
codes: megamm.vocab adds the offset of codebook j's id range to every code of column
j (`Vocab.audio_segment` takes `codes.reshape(frames, C)`). Input is zero-padded to a
whole number of frames; decode returns whole frames (cut to the original length
yourself if you kept it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megamm.tokenizers.dsp import mel_filters
from megamm.tokenizers.io import load_weights, read_info, save_weights, write_info
from megamm.tokenizers.layers import ResBlock
from megamm.tokenizers.quantize import ResidualVQ
from megamm.tokenizers.codebook_stats import code_usage
from megamm.runtime import progress_bar, torch_threads
from megamm.schedule import warmup_cosine



def padded_clips(audio, hop: int) -> torch.Tensor:
    """float32 `[B, T]` clips -> a tensor `[B, frames * hop]`, zero-padded to whole frames
    (what an audio tokenizer's encode takes); ValueError for another shape."""
    wave = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if wave.ndim != 2:
        raise ValueError(f"audio must be float32 [B, T], got shape {list(wave.shape)}")
    return F.pad(wave, (0, -(-wave.shape[1] // hop) * hop - wave.shape[1]))


def checked_codes(ids, n_codebooks: int, codebook_size: int) -> torch.Tensor:
    """Frame-major codes `[B, frames * n_codebooks]` -> int64 tensor; ValueError for another
    shape or a code outside [0, codebook_size) (what an audio tokenizer's decode takes)."""
    codes = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if codes.ndim != 2 or codes.shape[1] % n_codebooks:
        raise ValueError(f"audio codes must be [B, frames * {n_codebooks}], got {list(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"audio code outside [0, {codebook_size})")
    return codes

@dataclass(frozen=True)
class AudioCodecConfig:
    sample_rate: int = 16000
    n_fft: int = 640
    """STFT window (Hann) of the analysis features and of the synthesis."""
    stft_hop: int = 160
    """STFT hop in samples: the rate at which the conv stacks run (100 Hz at 16 kHz)."""
    frame_stride: int = 4
    """STFT frames per code frame; hop = stft_hop * frame_stride."""
    channels: int = 128
    blocks: int = 2
    """Residual blocks at each of the two rates, in the encoder and in the decoder."""
    code_dim: int = 64
    n_codebooks: int = 4
    codebook_size: int = 256

    def __post_init__(self):
        for name in ("n_fft", "stft_hop", "frame_stride", "channels", "code_dim", "n_codebooks",
                     "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"audio codec {name} must be >= 1, got {getattr(self, name)}")
        if self.frame_stride % 2 and self.frame_stride > 1:
            raise ValueError(f"frame_stride must be 1 or even, got {self.frame_stride}")

    @property
    def hop(self) -> int:
        return self.stft_hop * self.frame_stride

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop

    @property
    def tokens_per_second(self) -> float:
        return self.frames_per_second * self.n_codebooks


@dataclass(frozen=True)
class AudioTrainConfig:
    steps: int = 1500
    batch_size: int = 16
    crop_frames: int = 8
    """Length of a training crop in frames (x hop samples)."""
    lr: float = 2e-3
    commitment: float = 0.25
    wave_weight: float = 0.5
    """Weight of the L1 waveform loss next to the multi-resolution spectral losses."""
    restart_every: int = 50
    seed: int = 0
    threads: int = 1
    """Intra-op torch threads while training (1: bit-identical everywhere, see torch_threads)."""


class Codec(nn.Module):
    """A convolutional codec in the STFT domain (in the spirit of Vocos).

    Encoder: log-magnitude STFT frames -> conv + residual blocks at the STFT rate ->
    strided conv down to the code frame rate -> residual blocks -> code_dim.
    Decoder: the mirror image, ending in a log-magnitude and a phase per STFT bin,
    turned into a waveform by the inverse STFT. No layer runs at the sample rate,
    which keeps training and encoding cheap on a CPU.
    """

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg
        bins, c, s = cfg.n_fft // 2 + 1, cfg.channels, cfg.frame_stride
        down = ([nn.ELU(), nn.Conv1d(c, c, 2 * s, stride=s, padding=s // 2)] if s > 1 else [])
        up = ([nn.ELU(), nn.ConvTranspose1d(c, c, 2 * s, stride=s, padding=s // 2)] if s > 1 else [])
        self.encoder = nn.Sequential(
            nn.Conv1d(bins, c, 3, padding=1), *_res_stack(c, cfg.blocks), *down, *_res_stack(c, cfg.blocks),
            nn.ELU(), nn.Conv1d(c, cfg.code_dim, 1))
        self.decoder = nn.Sequential(
            nn.Conv1d(cfg.code_dim, c, 3, padding=1), *_res_stack(c, cfg.blocks), *up, *_res_stack(c, cfg.blocks),
            nn.ELU(), nn.Conv1d(c, 2 * bins, 1))
        self.rvq = ResidualVQ(cfg.n_codebooks, cfg.codebook_size, cfg.code_dim)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def encode_latent(self, wave: torch.Tensor) -> torch.Tensor:
        """`[B, T]` (T a multiple of hop) -> `[B, frames, D]`."""
        spec = torch.stft(wave, self.cfg.n_fft, self.cfg.stft_hop, window=self.window, return_complex=True)
        feats = torch.log(spec.abs()[..., : wave.shape[1] // self.cfg.stft_hop] + 1e-5)  # [B, bins, T / stft_hop]
        return self.encoder(feats).transpose(1, 2)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, frames, D]` -> `[B, frames * hop]`."""
        out = self.decoder(z.transpose(1, 2))  # [B, 2 * bins, frames * frame_stride]
        log_mag, phase = out.chunk(2, dim=1)
        spec = torch.polar(torch.exp(log_mag.clamp(max=6.0)), phase)
        spec = F.pad(spec, (0, 1))  # the STFT of T samples has T / stft_hop + 1 frames
        n = z.shape[1] * self.cfg.hop
        return torch.istft(spec, self.cfg.n_fft, self.cfg.stft_hop, window=self.window, length=n)


def _res_stack(channels: int, n: int) -> list[nn.Module]:
    return [ResBlock(channels, dims=1, kernel=3, dilation=1 + 2 * (i % 2)) for i in range(n)]


class AudioTokenizer:
    kind = "audio"

    def __init__(self, cfg: AudioCodecConfig, model: Codec | None = None, report: dict | None = None):
        self.cfg = cfg
        self.model = (model or Codec(cfg)).eval()
        self.report = report or {}

    @property
    def n_codebooks(self) -> int:
        return self.cfg.n_codebooks

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def hop(self) -> int:
        return self.cfg.hop

    def n_frames(self, n_samples: int) -> int:
        return -(-int(n_samples) // self.cfg.hop)

    # ---- encode / decode --------------------------------------------------------------
    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> np.ndarray:
        """float32 `[B, T]` at `sample_rate` -> int64 `[B, frames * C]`, frame-major."""
        wave = padded_clips(audio, self.cfg.hop)
        z = self.model.encode_latent(wave)  # [B, frames, D]
        codes = self.model.rvq.encode(z.reshape(-1, z.shape[-1]))  # [B * frames, C]
        return codes.reshape(wave.shape[0], -1).numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self, ids) -> np.ndarray:
        """int `[B, frames * C]` (frame-major) -> float32 `[B, frames * hop]`."""
        codes = checked_codes(ids, self.cfg.n_codebooks, self.cfg.codebook_size)
        C = self.cfg.n_codebooks
        B, frames = codes.shape[0], codes.shape[1] // C
        if frames == 0:
            return np.zeros((B, 0), np.float32)
        z = self.model.rvq.decode(codes.reshape(B * frames, C)).reshape(B, frames, -1)
        return self.model.decode_latent(z).clamp(-1, 1).numpy().astype(np.float32)

    def codebook_usage(self, clips: list[np.ndarray]) -> list[dict]:
        """Per codebook, over `clips`: fraction of codes used and perplexity."""
        codes = np.concatenate([self.encode(c[None]).reshape(-1, self.cfg.n_codebooks) for c in clips])
        return [code_usage(codes[:, j], self.cfg.codebook_size) for j in range(self.cfg.n_codebooks)]

    # ---- training ---------------------------------------------------------------------
    @classmethod
    def train(cls, clips: list[np.ndarray], cfg: AudioCodecConfig = AudioCodecConfig(),
              train: AudioTrainConfig = AudioTrainConfig(), progress: bool = True) -> "AudioTokenizer":
        """Fit the codec to float32 clips `[T_i]` at cfg.sample_rate: random crops of
        `crop_frames` frames, multi-resolution log-STFT + log-mel + L1 waveform losses,
        residual codebooks by EMA with dead-code restarts. Deterministic per seed."""
        with torch_threads(train.threads):
            gen = torch.Generator().manual_seed(train.seed)
            with torch.random.fork_rng():
                torch.manual_seed(train.seed)
                model = Codec(cfg)
            tok = cls(cfg, model)
            crop = train.crop_frames * cfg.hop
            data = torch.cat([torch.from_numpy(np.asarray(c, np.float32)) for c in clips])
            starts_max = data.numel() - crop
            if starts_max <= 0:
                raise ValueError(f"audio training needs more than {crop} samples, got {data.numel()}")
            opt = torch.optim.Adam(model.parameters(), lr=train.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, train.steps))
            model.train()
            bar = progress_bar(range(train.steps), "audio tokenizer", progress)
            for step in bar:
                starts = torch.randint(0, starts_max, (train.batch_size,), generator=gen)
                x = data[starts[:, None] + torch.arange(crop)[None, :]]  # [B, crop]
                z = model.encode_latent(x)  # [B, frames, D]
                flat = z.reshape(-1, z.shape[-1])
                zq, _, commit = model.rvq(flat, gen)
                y = model.decode_latent(zq.reshape(z.shape))
                wave_l1 = (y - x).abs().mean()
                loss = train.wave_weight * wave_l1 + spectral_loss(x, y, cfg.sample_rate) + train.commitment * commit
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if (step + 1) % train.restart_every == 0 and step + 1 < train.steps * 0.9:
                    model.rvq.restart_dead_codes(flat.detach(), gen)
                if step % 25 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", l1=f"{wave_l1.item():.4f}")
            model.eval()
            tok.report = {"steps": train.steps, "final_loss": round(loss.item(), 6), "seed": train.seed}
            return tok

    # ---- files --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(directory, self.model)
        write_info(directory, self.kind, {"config": asdict(self.cfg), "report": self.report})

    @classmethod
    def load(cls, directory: str | Path) -> "AudioTokenizer":
        info = read_info(directory, cls.kind)
        cfg = AudioCodecConfig(**info["config"])
        model = Codec(cfg)
        load_weights(directory, model)
        return cls(cfg, model, info.get("report"))

    def __repr__(self) -> str:
        c = self.cfg
        return (f"AudioTokenizer({c.sample_rate} Hz, hop {c.hop}, {c.n_codebooks} x {c.codebook_size} codes, "
                f"{c.tokens_per_second:g} tokens/s)")


def spectral_loss(x: torch.Tensor, y: torch.Tensor, sample_rate: int,
                  ffts: tuple[int, ...] = (256, 512, 1024), n_mels: int = 64) -> torch.Tensor:
    """Multi-resolution L1 distance of log magnitudes, plus the L1 distance of log-mel
    spectrograms at the largest resolution, between target `x` and output `y` `[B, T]`."""
    loss = y.new_zeros(())
    for n_fft in ffts:
        window = torch.hann_window(n_fft)
        with torch.no_grad():
            sx = torch.stft(x, n_fft, n_fft // 4, window=window, return_complex=True).abs()
        sy = torch.stft(y, n_fft, n_fft // 4, window=window, return_complex=True).abs()
        loss = loss + (torch.log(sx + 1e-5) - torch.log(sy + 1e-5)).abs().mean() / len(ffts)
    fb = mel_filters(n_fft, n_mels, sample_rate)  # [n_mels, bins] at the last (largest) n_fft
    mel = (torch.log((fb @ sx).clamp(min=1e-5)) - torch.log((fb @ sy).clamp(min=1e-5))).abs().mean()
    return loss + mel
