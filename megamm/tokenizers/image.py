"""Image tokenizer: a small VQ-VAE with a fixed number of codes per image.

    encode: uint8 [B, H, W, 3] (any H, W; resized to image_size) -> int64 [B, N]
    decode: int64 [B, N]                                       -> uint8 [B, S, S, 3]

with S = image_size and N = (S / downsample)^2 codes in raster order, each in
[0, codebook_size). These are tokenizer-local codes: megamm.vocab adds the offset
of the image range (`Vocab.image_segment`).

Two-tone mode (`palette_codes > 0`), for images drawn in two colours, such as the
embedded data set's painted digits: an image is factored into its background colour
(the median of its border), its foreground colour (the pixels farthest from it), both
snapped to a palette of `palette_codes` colours fitted to the training images, and a
one-channel blend map (0 = background, 1 = foreground) that the VQ-VAE encodes with
the other `codebook_size - palette_codes` codes. Codes are then

    [background, foreground, shape code x grid^2]      (N = grid^2 + 2)

with palette entry i as code `codebook_size - palette_codes + i`. A shape code then
means the same stroke in every colour, where an RGB code has to spend the codebook on
every (shape, colour pair) it meets. On the painted digits (benchmarks/tokenizer_quality.py),
a linear probe reads held-out digits from the default recipe's codes (48 shape + 16
palette) at 0.97, from a 256-code RGB tokenizer's at 0.69.

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
    """All codes, palette entries included."""
    palette_codes: int = 0
    """0: the VQ-VAE encodes RGB. > 0: two-tone mode (module docstring) with a palette of
    this many colours, taken from the end of the codebook."""

    def __post_init__(self):
        if not 0 <= self.palette_codes <= self.codebook_size - 2:
            raise ValueError(f"palette_codes must be in [0, codebook_size - 2], got {self.palette_codes}")
        n = self.downsample.bit_length() - 1
        if self.downsample < 2 or 2 ** n != self.downsample:
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of downsample {self.downsample}")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def shape_codes(self) -> int:
        """Codes of the VQ-VAE's own codebook (all of them unless in two-tone mode)."""
        return self.codebook_size - self.palette_codes

    @property
    def in_channels(self) -> int:
        return 1 if self.palette_codes else 3

    @property
    def tokens_per_image(self) -> int:
        return self.grid ** 2 + (2 if self.palette_codes else 0)


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
        enc = [nn.Conv2d(cfg.in_channels, widths[0], 4, stride=2, padding=1)]
        for i in range(1, n_down):
            enc += [ResBlock(widths[i - 1]), nn.Conv2d(widths[i - 1], widths[i], 4, stride=2, padding=1)]
        enc += [ResBlock(widths[-1]), ResBlock(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(cfg.code_dim, widths[-1], 3, padding=1), ResBlock(widths[-1]), ResBlock(widths[-1])]
        for i in reversed(range(1, n_down)):
            dec += [nn.ReLU(), nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1),
                    ResBlock(widths[i - 1])]
        dec += [nn.ReLU(), nn.ConvTranspose2d(widths[0], cfg.in_channels, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.vq = VectorQuantizer(cfg.shape_codes, cfg.code_dim)
        if cfg.palette_codes:
            self.register_buffer("palette", torch.zeros(cfg.palette_codes, 3))  # RGB in [-1, 1]

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, S, S]` in [-1, 1] -> `[B, g, g, D]` continuous latents (C = cfg.in_channels)."""
        return self.encoder(x).permute(0, 2, 3, 1)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, g, g, D]` -> `[B, C, S, S]` (unclamped)."""
        return self.decoder(z.permute(0, 3, 1, 2))


def two_tone(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB `[B, 3, S, S]` -> (background `[B, 3]`, foreground `[B, 3]`): the per-channel
    median of the border pixels, and the mean of the pixels at >= 90% of the largest
    distance from it (the background again for a one-colour image)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [B, 3, 4S]
    bg = border.median(dim=-1).values
    flat = x.flatten(2)  # [B, 3, S*S]
    dist = (flat - bg[..., None]).norm(dim=1)  # [B, S*S]
    far = (dist >= 0.9 * dist.amax(dim=1, keepdim=True)).to(x.dtype)
    fg = (flat * far[:, None]).sum(-1) / far.sum(-1, keepdim=True)
    return bg, fg


def blend_map(x: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """How far each pixel of `x` `[B, 3, S, S]` lies from `bg` towards `fg` (`[B, 3]`),
    projected on the line between them and clipped -> `[B, 1, S, S]` in [0, 1]."""
    diff = (fg - bg)[..., None, None]
    t = ((x - bg[..., None, None]) * diff).sum(1, keepdim=True) / diff.pow(2).sum(1, keepdim=True).clamp(min=1e-6)
    return t.clamp(0.0, 1.0)


def fit_palette(colours: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """k colours `[k, 3]` summarising `colours` `[M, 3]`: farthest-point seeding from the
    mean, then Lloyd's iterations with per-channel medians (robust to the foreground
    estimates of faint strokes, which are blends; an empty cluster keeps its centre).
    Deterministic."""
    centres = [colours.mean(0)]
    for _ in range(k - 1):
        d = torch.cdist(colours, torch.stack(centres)).amin(dim=1)
        centres.append(colours[int(d.argmax())])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(colours, c).argmin(dim=1)
        for j in range(k):
            members = colours[assign == j]
            if len(members):
                c[j] = members.median(dim=0).values
    return c


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

    @property
    def image_size(self) -> int:
        """Side of the square images it encodes and decodes."""
        return self.cfg.image_size

    @property
    def grid(self) -> int:
        """Side of the square grid of shape codes."""
        return self.cfg.grid

    can_decode = True

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

    def model_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[B, 3, S, S]` in [-1, 1] -> (what the VQ-VAE encodes, palette indices `[B, 2]`
        (background, foreground) in two-tone mode, else None)."""
        if not self.cfg.palette_codes:
            return x, None
        bg, fg = two_tone(x)
        pal = torch.cdist(torch.stack([bg, fg], dim=1), self.model.palette[None]).argmin(dim=-1)  # [B, 2]
        colours = self.model.palette[pal]  # [B, 2, 3]
        return blend_map(x, colours[:, 0], colours[:, 1]) * 2 - 1, pal

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 `[B, H, W, 3]` -> int64 codes `[B, N]` in [0, codebook_size), raster order
        (after the two palette codes in two-tone mode)."""
        x, pal = self.model_input(self.to_tensor(images))
        z = self.model.encode_latent(x)  # [B, g, g, D]
        codes = self.model.vq.nearest(z.reshape(-1, z.shape[-1])).reshape(z.shape[0], -1)
        if pal is not None:
            codes = torch.cat([pal + self.cfg.shape_codes, codes], dim=1)
        return codes.numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self, ids) -> np.ndarray:
        """int codes `[B, N]` -> uint8 images `[B, S, S, 3]`."""
        codes = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        g, n, k = self.cfg.grid, self.cfg.tokens_per_image, self.cfg.shape_codes
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"image codes must be [B, {n}], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise ValueError(f"image code outside [0, {self.cfg.codebook_size})")
        if self.cfg.palette_codes:
            # A sampler only knows the image range, so a code may sit in the other role's
            # part of it: a palette slot reads a shape code modulo the palette size, a
            # shape slot reads a palette code modulo the shape codes.
            pal, codes = codes[:, :2], codes[:, 2:]
            pal = torch.where(pal >= k, pal - k, pal) % self.cfg.palette_codes
            codes = codes % k
        z = self.model.vq.lookup(codes).reshape(codes.shape[0], g, g, -1)
        x = self.model.decode_latent(z).clamp(-1, 1)
        if self.cfg.palette_codes:
            colours = self.model.palette[pal]  # [B, 2, 3]
            bg, fg = colours[:, 0, :, None, None], colours[:, 1, :, None, None]
            x = bg + (x + 1) / 2 * (fg - bg)
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def codebook_usage(self, images: np.ndarray, batch_size: int = 256) -> dict:
        """Over `images`: fraction of the VQ-VAE's codes (the palette excluded) used at
        least once, and the perplexity of their distribution (= shape_codes when all are
        equally used)."""
        skip = 2 if self.cfg.palette_codes else 0
        codes = np.concatenate([self.encode(images[i:i + batch_size])[:, skip:]
                                for i in range(0, len(images), batch_size)]).reshape(-1)
        return code_usage(codes, self.cfg.shape_codes)

    # ---- training ---------------------------------------------------------------------
    @classmethod
    def train(cls, images: np.ndarray, cfg: ImageTokenizerConfig = ImageTokenizerConfig(),
              train: ImageTrainConfig = ImageTrainConfig(), progress: bool = True) -> "ImageTokenizer":
        """Fit a VQ-VAE to uint8 `images` `[N, H, W, 3]` (MSE + commitment, Adam with a
        cosine schedule, codebook by EMA); in two-tone mode first the palette, to the
        images' background and foreground colours, then the VQ-VAE to their blend maps.
        Deterministic for the same inputs and seed."""
        with torch_threads(train.threads):
            gen = torch.Generator().manual_seed(train.seed)
            with torch.random.fork_rng():
                torch.manual_seed(train.seed)  # parameter init only; the caller's RNG is untouched
                model = VQVAE(cfg)
            tok = cls(cfg, model)
            data = tok.to_tensor(images)  # [N, 3, S, S]
            if cfg.palette_codes:
                model.palette.copy_(fit_palette(torch.cat(two_tone(data)), cfg.palette_codes))
                data = tok.model_input(data)[0]  # [N, 1, S, S]
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
        palette = f", two-tone: 2 of {c.palette_codes} palette codes first" if c.palette_codes else ""
        return (f"ImageTokenizer({c.image_size}x{c.image_size} -> {c.grid}x{c.grid} codes "
                f"of {c.codebook_size}{palette})")
