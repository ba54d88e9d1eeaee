"""The image judge: which digit, foreground paint and background paint an image shows.

    ImageJudge.predict(uint8 [N, 28, 28, 3]) -> [{"digit": 8, "foreground": "dark green",
                                                  "background": "bright cyan"}, ...]

Fixed features first (`image_features`), then small learned heads:

    background colour  median of the 2-pixel border (the dataset frames every digit
                       with background, like MNIST)
    ink map            each pixel's colour distance from the background, divided by the
                       90th percentile of those distances (at least INK_FLOOR, so a flat
                       image stays blank) and clipped to 1: the digit's shape whatever
                       its colours, which a few stray blotches do not rescale
    foreground colour  median colour of the pixels with ink >= 0.75 (the background
                       colour when there are none)

    digit head         a small CNN on the ink map, pooled to 14 x 14 (the digits are
                       8 x 8 scans upscaled, so nothing is lost)
    paint heads        an MLP each on the two colours -> one of the 12 PAINTS

It is trained on the train split of the embedded dataset only, painted several times,
plus other paintings passed through the image tokenizer (decode(encode(x))), each
decoded from its codes as they are and again with some codes replaced by random ones
(the blotches a model's wrong codes make), so it also reads decoder outputs; random
shifts of up to `shift` pixels make it tolerate a digit that is not exactly centred.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megamm.demo.captions import PAINTS, caption_fields
from megamm.demo.digits import IMAGE_SIZE, make_split
from megamm.demo.judge_files import load_judge_weights, read_judge_info, save_judge
from megamm.runtime import progress_bar, torch_threads
from megamm.schedule import warmup_cosine

HEADS = ("digit", "foreground", "background")
INK_FLOOR = 0.1
"""Colour distances (RGB in [0, 1]) are scaled by their 90th percentile, but by at least
this much, so decoder noise on a flat image is not blown up into a shape. The closest
two paints of different colours (the dataset's rule) are about 0.33 apart."""


@dataclass(frozen=True)
class ImageJudgeConfig:
    channels: int = 16
    """Width of the digit CNN's first conv; doubled after its halving."""
    hidden: int = 128
    colour_hidden: int = 64


@dataclass(frozen=True)
class ImageJudgeTrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    colourings: int = 3
    """Paintings per train digit of the original images."""
    roundtrip_colourings: int = 2
    """Paintings per train digit (other colours) seen through the image tokenizer."""
    corrupt_max: float = 0.1
    """Each round trip is decoded again with every code replaced by a random one with a
    probability drawn per image from [0, corrupt_max] (0: no second decoding)."""
    shift: int = 2
    """Random translation of training images, in pixels, each way."""
    seed: int = 0
    threads: int = 1
    """Intra-op torch threads while training (1: the same result on every machine)."""


class ImageJudgeNet(nn.Module):
    def __init__(self, cfg: ImageJudgeConfig):
        super().__init__()
        c, grid = cfg.channels, IMAGE_SIZE // 4
        self.digit = nn.Sequential(
            nn.AvgPool2d(2),  # 14 x 14
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),  # 7 x 7
            nn.Flatten(), nn.Linear(2 * c * grid * grid, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
        self.paints = nn.ModuleDict({name: nn.Sequential(nn.Linear(6, cfg.colour_hidden), nn.ReLU(),
                                                         nn.Linear(cfg.colour_hidden, len(PAINTS)))
                                     for name in ("foreground", "background")})

    def forward(self, ink: torch.Tensor, colours: torch.Tensor) -> dict[str, torch.Tensor]:
        """ink `[B, 1, 28, 28]` in [0, 1], colours `[B, 6]` (background RGB, foreground
        RGB, in [-1, 1]) -> logits per head `[B, classes]`."""
        return {"digit": self.digit(ink), **{name: head(colours) for name, head in self.paints.items()}}


class ImageJudge:
    kind = "image_judge"

    def __init__(self, cfg: ImageJudgeConfig = ImageJudgeConfig(), model: ImageJudgeNet | None = None,
                 report: dict | None = None):
        self.cfg = cfg
        self.model = (model or ImageJudgeNet(cfg)).eval()
        self.report = report or {}

    # ---- reading images -------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        """uint8 `[N, H, W, 3]` -> per head, float32 `[N, classes]` class probabilities
        (digit: 0..9; foreground/background: in PAINTS order)."""
        ink, colours = image_features(images)
        out = {name: [] for name in HEADS}
        for i in range(0, len(ink), batch_size):
            for name, logits in self.model(ink[i:i + batch_size], colours[i:i + batch_size]).items():
                out[name].append(logits.softmax(-1))
        return {name: (torch.cat(p).numpy() if p else np.zeros((0, 10 if name == "digit" else len(PAINTS)),
                                                                np.float32))
                for name, p in out.items()}

    def predict(self, images: np.ndarray) -> list[dict]:
        """uint8 `[N, H, W, 3]` (resized to 28 x 28 if needed) -> per image
        {"digit": int, "foreground": "<shade> <colour>", "background": "<shade> <colour>"}."""
        p = self.probabilities(images)
        digit, fg, bg = (p[name].argmax(-1) for name in HEADS)
        return [{"digit": int(d), "foreground": PAINTS[f], "background": PAINTS[b]} for d, f, b in zip(digit, fg, bg)]

    def accuracy(self, images: np.ndarray, captions: list[str]) -> dict[str, float]:
        """Fraction of `images` whose digit / foreground / background match their
        caption, and "all": the fraction with all three right."""
        truth = [caption_fields(c) for c in captions]
        hits = np.array([[p[k] == t[k] for k in HEADS] for p, t in zip(self.predict(images), truth)], bool)
        if not len(hits):
            raise ValueError("accuracy needs at least one image")
        return {**{k: float(hits[:, i].mean()) for i, k in enumerate(HEADS)}, "all": float(hits.all(1).mean())}

    # ---- training ---------------------------------------------------------------------------
    @classmethod
    def train(cls, images: np.ndarray, captions: list[str], cfg: ImageJudgeConfig = ImageJudgeConfig(),
              train: ImageJudgeTrainConfig = ImageJudgeTrainConfig(), progress: bool = True) -> "ImageJudge":
        """Fit to uint8 `images` `[N, H, W, 3]` labelled by their `captions` (summed cross-
        entropy of the three heads, Adam with a cosine schedule, random shifts).
        Deterministic for the same inputs and seed."""
        labels = {k: torch.tensor(v) for k, v in caption_labels(captions).items()}  # each [N]
        with torch_threads(train.threads):
            gen = torch.Generator().manual_seed(train.seed)
            with torch.random.fork_rng():
                torch.manual_seed(train.seed)  # parameter init only; the caller's RNG is untouched
                model = ImageJudgeNet(cfg)
            ink, colours = image_features(images)  # [N, 1, 28, 28], [N, 6]
            opt = torch.optim.Adam(model.parameters(), lr=train.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, train.steps))
            model.train()
            bar = progress_bar(range(train.steps), "image judge", progress)
            for step in bar:
                idx = torch.randint(0, len(ink), (train.batch_size,), generator=gen)
                logits = model(random_shift(ink[idx], train.shift, gen), colours[idx])
                loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in HEADS)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            model.eval()
        return cls(cfg, model, {"steps": train.steps, "final_loss": round(loss.item(), 5),
                                "train_images": len(ink), "seed": train.seed})

    # ---- files ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        save_judge(directory, self.kind, asdict(self.cfg), self.report, self.model)

    @classmethod
    def load(cls, directory: str | Path) -> "ImageJudge":
        info = read_judge_info(directory, cls.kind)
        cfg = ImageJudgeConfig(**info["config"])
        model = ImageJudgeNet(cfg)
        load_judge_weights(directory, model)
        return cls(cfg, model, info.get("report"))

    def __repr__(self) -> str:
        return f"ImageJudge({self.cfg})"


def image_training_set(image_tokenizer, train: ImageJudgeTrainConfig = ImageJudgeTrainConfig(),
                       batch_size: int = 256) -> tuple[np.ndarray, list[str]]:
    """Train-split images and captions: `colourings` paintings of every train digit as
    they are, then `roundtrip_colourings` other paintings (seed + 1) through
    `image_tokenizer` (decode(encode(x))); without a tokenizer, originals only."""
    raw = make_split("train", colourings=train.colourings, seed=train.seed, audio=False)
    images, captions = [raw.images], list(raw.captions)
    if image_tokenizer is not None and train.roundtrip_colourings:
        other = make_split("train", colourings=train.roundtrip_colourings, seed=train.seed + 1, audio=False)
        with torch_threads(train.threads):
            images.append(roundtrip_images(image_tokenizer, other.images, batch_size))
            captions += other.captions
            if train.corrupt_max > 0:
                rng = np.random.default_rng([train.seed, 1])
                images.append(roundtrip_images(image_tokenizer, other.images, batch_size, train.corrupt_max, rng))
                captions += other.captions
    return np.concatenate(images), captions


def roundtrip_images(image_tokenizer, images: np.ndarray, batch_size: int = 256, corrupt: float = 0.0,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """decode(encode(images)) in batches: uint8 `[N, 28, 28, 3]` -> the same shape. With
    `corrupt` > 0, each code is first replaced by a random one with a probability drawn
    per image from [0, corrupt] (by `rng`)."""
    out = []
    for i in range(0, len(images), batch_size):
        codes = image_tokenizer.encode(images[i:i + batch_size])  # [B, N]
        if corrupt > 0:
            p = rng.uniform(0, corrupt, (len(codes), 1))
            codes = np.where(rng.random(codes.shape) < p,
                             rng.integers(0, image_tokenizer.codebook_size, codes.shape), codes)
        out.append(image_tokenizer.decode(codes))
    return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def caption_labels(captions: list[str]) -> dict[str, list[int]]:
    """Class indices per head: digit, and foreground/background as PAINTS indices."""
    fields = [caption_fields(c) for c in captions]
    return {"digit": [f["digit"] for f in fields],
            "foreground": [PAINTS.index(f["foreground"]) for f in fields],
            "background": [PAINTS.index(f["background"]) for f in fields]}


def image_features(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 `[N, H, W, 3]` (resized to 28 x 28 if needed) -> (ink `[N, 1, 28, 28]` in
    [0, 1], colours `[N, 6]`: background RGB then foreground RGB, in [-1, 1])."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got shape {list(images.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, H, W]
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE) and len(x):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    n = len(x)
    frame = torch.ones(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    frame[2:-2, 2:-2] = False
    if n == 0:
        return x.new_zeros(0, 1, IMAGE_SIZE, IMAGE_SIZE), x.new_zeros(0, 6)
    bg = x[:, :, frame].median(dim=-1).values  # [N, 3]
    dist = (x - bg[:, :, None, None]).norm(dim=1)  # [N, 28, 28]
    scale = torch.quantile(dist.flatten(1), 0.9, dim=1).clamp(min=INK_FLOOR)  # [N]
    ink = (dist / scale[:, None, None]).clamp(max=1.0)  # [N, 28, 28]
    core = (ink >= 0.75)[:, None].expand_as(x)  # [N, 3, 28, 28]
    fg = torch.where(core, x, torch.nan).flatten(2).nanmedian(dim=-1).values  # [N, 3]; NaN without ink
    fg = torch.where(fg.isnan(), bg, fg)
    return ink[:, None], torch.cat([bg, fg], 1) * 2 - 1


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image of `[B, C, H, W]` by up to `shift` pixels each way; the
    edge pixels (background) fill the uncovered border."""
    if shift <= 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")  # [B, C, H + 2s, W + 2s]
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B, 1), generator=gen)
    rows = (dy + torch.arange(H))[:, :, None]  # [B, H, 1]
    cols = (dx + torch.arange(W))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(B)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
