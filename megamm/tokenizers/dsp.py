"""Small signal helpers shared by the audio codec, the data tools and the benchmarks:
band-limited resampling, log-mel spectrograms and quality metrics.

Everything here is plain numpy/torch, deterministic, and needs no system package.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch


def resample(wave: np.ndarray, orig_rate: int, new_rate: int, taps: int = 32) -> np.ndarray:
    """Band-limited resampling of a mono float signal `[T]` -> `[round(T * new/orig)]`.

    Each output sample is a Kaiser-windowed sinc interpolation of the `2 * taps`
    nearest input samples; the cutoff sits just below the lower Nyquist frequency,
    so downsampling does not alias.
    """
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate or wave.size == 0:
        return wave.astype(np.float32)
    n_out = int(round(wave.size * new_rate / orig_rate))
    ratio = new_rate / orig_rate
    cutoff = 0.95 * min(1.0, ratio)  # as a fraction of the input Nyquist frequency
    offsets = np.arange(-taps + 1, taps + 1)  # [2 * taps]
    grid = np.linspace(-taps, taps, 2 * taps + 1)
    window = np.kaiser(2 * taps + 1, 8.0)
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, 8192):  # blocks keep the [n, 2 * taps] temporaries small
        t = np.arange(start, min(start + 8192, n_out)) / ratio  # output times, in input samples
        idx = np.floor(t).astype(np.int64)[:, None] + offsets[None, :]  # [n, 2 * taps]
        x = t[:, None] - idx  # distance of each tap from the output time
        kernel = cutoff * np.sinc(cutoff * x) * np.interp(x, grid, window)
        valid = (idx >= 0) & (idx < wave.size)
        samples = np.where(valid, wave[np.clip(idx, 0, wave.size - 1)], 0.0)
        out[start:start + t.size] = (samples * kernel).sum(axis=1)
    return out


@lru_cache(maxsize=8)
def mel_filters(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """`[n_mels, n_fft // 2 + 1]` triangular filters on the HTK mel scale."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    upper = (edges[2:, None] - freqs[None, :]) / (edges[2:, None] - edges[1:-1, None])
    return torch.from_numpy(np.maximum(0.0, np.minimum(lower, upper))).float()


def log_mel(wave: torch.Tensor, sample_rate: int = 16000, n_fft: int = 1024, hop: int = 256,
            n_mels: int = 64) -> torch.Tensor:
    """Log-mel spectrogram of `[B, T]` float audio -> `[B, n_mels, frames]` (natural log)."""
    window = torch.hann_window(n_fft, device=wave.device)
    spec = torch.stft(wave, n_fft, hop, window=window, return_complex=True).abs()  # [B, F, frames]
    mel = mel_filters(n_fft, n_mels, sample_rate).to(wave.device) @ spec
    return torch.log(mel.clamp(min=1e-5))


def mel_distance(ref: np.ndarray, est: np.ndarray, sample_rate: int = 16000) -> float:
    """Mean absolute difference of log-mel spectrograms (nats) of two `[B, T]` signals,
    cut to the shorter length. 0 = identical; about 1 is clearly audible damage."""
    ref_t, est_t = _paired(ref, est)
    return float((log_mel(ref_t, sample_rate) - log_mel(est_t, sample_rate)).abs().mean())


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    """Signal-to-noise ratio (dB) of `est` against `ref` over all samples, cut to the
    shorter length."""
    ref_t, est_t = _paired(ref, est)
    noise = float(((ref_t - est_t) ** 2).sum())
    signal = float((ref_t ** 2).sum())
    return 10.0 * math.log10(max(signal, 1e-12) / max(noise, 1e-12))


def psnr_db(ref: np.ndarray, est: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two uint8 images (any matching shape)."""
    mse = float(np.mean((np.asarray(ref, np.float64) - np.asarray(est, np.float64)) ** 2))
    return 10.0 * math.log10(255.0 ** 2 / max(mse, 1e-12))


def _paired(ref, est) -> tuple[torch.Tensor, torch.Tensor]:
    ref = np.atleast_2d(np.asarray(ref, np.float32))
    est = np.atleast_2d(np.asarray(est, np.float32))
    n = min(ref.shape[-1], est.shape[-1])
    return torch.from_numpy(ref[..., :n].copy()), torch.from_numpy(est[..., :n].copy())
