"""Image tokenizer: a small VQ-VAE with a fixed number of codes per image.

    encode: uint8 [B, H, W, 3] (any H, W; resized to image_size) -> int64 [B, N]
    decode: int64 [B, N]                                       -> uint8 [B, S, S, 3]

with S = image_size and N = (S / downsample)^2 codes in raster order, each in
[0, codebook_size). These are tokenizer-local codes: megamm.vocab adds the offset
of the image range (`Vocab.image_segment`).

Encoder: conv stem, then per halving a residual block and a strided conv, then a
1x1 projection to the code dimension; the decoder mirrors it with transposed convs.
The codebook is an EMA vector quantiser with dead-code restarts (quantize.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megamm.tokenizers.io import load_weights, read_info, save_weights, write_info
from megamm.tokenizers.quantize import VectorQuantizer
from megamm.tokenizers.layers import ResBlock
from megamm.tokenizers.codebook_stats import code_usage
from megamm.runtime import progress_bar, torch_threads
from megamm.schedule import warmup_cosine


@dataclass(frozen=True)
class ImageTokenizerConfig:
    image_size: int = 28
    """Images are resized to image_size x image_size before encoding."""
    downsample: int = 4
    """Side of the pixel patch one code covers (a power of two)."""
    channels: int = 48
    """Width of the first conv stage; doubled after the first halving."""
    code_dim: int = 16
    codebook_size: int = 256

    def __post_init__(self):
        n = self.downsample.bit_length() - 1
        if self.downsample < 2 or 2 ** n != self.downsample:
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of downsample {self.downsample}")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid ** 2


@dataclass(frozen=True)
class ImageTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    commitment: float = 0.25
    restart_every: int = 50
    seed: int = 0
    threads: int = 1
    """Intra-op torch threads while training (1: bit-identical everywhere, see torch_threads)."""


class VQVAE(nn.Module):
    """Encoder: a strided conv from RGB, then per further halving a residual block and
    a strided conv, two residual blocks at the code grid and a 1x1 projection to the
    code dimension. The decoder mirrors it with transposed convs. Nothing runs at
    full resolution except the first and last conv, which keeps CPU training cheap."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        n_down = cfg.downsample.bit_length() - 1
        widths = [cfg.channels * min(2 ** i, 2) for i in range(n_down)]  # e.g. [48, 96]
        enc = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1)]
        for i in range(1, n_down):
            enc += [ResBlock(widths[i - 1]), nn.Conv2d(widths[i - 1], widths[i], 4, stride=2, padding=1)]
        enc += [ResBlock(widths[-1]), ResBlock(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(cfg.code_dim, widths[-1], 3, padding=1), ResBlock(widths[-1]), ResBlock(widths[-1])]
        for i in reversed(range(1, n_down)):
            dec += [nn.ReLU(), nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1),
                    ResBlock(widths[i - 1])]
        dec += [nn.ReLU(), nn.ConvTranspose2d(widths[0], 3, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.vq = VectorQuantizer(cfg.codebook_size, cfg.code_dim)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` in [-1, 1] -> `[B, g, g, D]` continuous latents."""
        return self.encoder(x).permute(0, 2, 3, 1)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, g, g, D]` -> `[B, 3, S, S]` (unclamped)."""
        return self.decoder(z.permute(0, 3, 1, 2))


class ImageTokenizer:
    kind = "image"

    def __init__(self, cfg: ImageTokenizerConfig, model: VQVAE | None = None, report: dict | None = None):
        self.cfg = cfg
        self.model = (model or VQVAE(cfg)).eval()
        self.report = report or {}

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.tokens_per_image

    # ---- encode / decode --------------------------------------------------------------
    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 `[B, H, W, 3]` -> float `[B, 3, S, S]` in [-1, 1] (resized if needed)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3], got shape {list(images.shape)}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 `[B, H, W, 3]` -> int64 codes `[B, N]` in [0, codebook_size), raster order."""
        z = self.model.encode_latent(self.to_tensor(images))  # [B, g, g, D]
        codes = self.model.vq.nearest(z.reshape(-1, z.shape[-1]))
        return codes.reshape(z.shape[0], -1).numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self, ids) -> np.ndarray:
        """int codes `[B, N]` -> uint8 images `[B, S, S, 3]`."""
        codes = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        g = self.cfg.grid
        if codes.ndim != 2 or codes.shape[1] != g * g:
            raise ValueError(f"image codes must be [B, {g * g}], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise ValueError(f"image code outside [0, {self.cfg.codebook_size})")
        z = self.model.vq.lookup(codes).reshape(codes.shape[0], g, g, -1)
        x = self.model.decode_latent(z).clamp(-1, 1)
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def codebook_usage(self, images: np.ndarray, batch_size: int = 256) -> dict:
        """Over `images`: fraction of codes used at least once, and the perplexity of the
        code distribution (= codebook_size when all codes are equally used)."""
        codes = np.concatenate([self.encode(images[i:i + batch_size])
                                for i in range(0, len(images), batch_size)]).reshape(-1)
        return code_usage(codes, self.cfg.codebook_size)

    # ---- training ---------------------------------------------------------------------
    @classmethod
    def train(cls, images: np.ndarray, cfg: ImageTokenizerConfig = ImageTokenizerConfig(),
              train: ImageTrainConfig = ImageTrainConfig(), progress: bool = True) -> "ImageTokenizer":
        """Fit a VQ-VAE to uint8 `images` `[N, H, W, 3]` (MSE + commitment, Adam with a
        cosine schedule, codebook by EMA). Deterministic for the same inputs and seed."""
        with torch_threads(train.threads):
            gen = torch.Generator().manual_seed(train.seed)
            with torch.random.fork_rng():
                torch.manual_seed(train.seed)  # parameter init only; the caller's RNG is untouched
                model = VQVAE(cfg)
            tok = cls(cfg, model)
            data = tok.to_tensor(images)  # [N, 3, S, S]
            opt = torch.optim.Adam(model.parameters(), lr=train.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, train.steps))
            model.train()
            bar = progress_bar(range(train.steps), "image tokenizer", progress)
            for step in bar:
                x = data[torch.randint(0, len(data), (train.batch_size,), generator=gen)]
                z = model.encode_latent(x)  # [B, g, g, D]
                flat = z.reshape(-1, z.shape[-1])
                zq, codes, commit = model.vq(flat, gen)
                recon = model.decode_latent(zq.reshape(z.shape))
                mse = F.mse_loss(recon, x)
                loss = mse + train.commitment * commit
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if (step + 1) % train.restart_every == 0 and step + 1 < train.steps * 0.9:
                    model.vq.restart_dead_codes(flat.detach(), gen)
                if step % 25 == 0:
                    bar.set_postfix(psnr=f"{10 * math.log10(4 / max(mse.item(), 1e-10)):.1f}",
                                    used=int((model.vq.ema_count > 0.05).sum()))
            model.eval()
            tok.report = {"steps": train.steps, "final_mse": round(mse.item(), 6), "seed": train.seed}
            return tok

    # ---- files --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(directory, self.model)
        write_info(directory, self.kind, {"config": asdict(self.cfg), "report": self.report})

    @classmethod
    def load(cls, directory: str | Path) -> "ImageTokenizer":
        info = read_info(directory, cls.kind)
        cfg = ImageTokenizerConfig(**info["config"])
        model = VQVAE(cfg)
        load_weights(directory, model)
        return cls(cfg, model, info.get("report"))

    def __repr__(self) -> str:
        c = self.cfg
        return (f"ImageTokenizer({c.image_size}x{c.image_size} -> {c.grid}x{c.grid} codes "
                f"of {c.codebook_size})")
