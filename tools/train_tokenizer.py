#!/usr/bin/env python
"""Train one tokenizer from a JSONL manifest (the format of tools/prepare_data.py).

    python tools/train_tokenizer.py {text,image,audio} MANIFEST.jsonl --out DIR
        [--steps N] [--batch-size N] [--vocab-size N] [--image-size S] [--channels C]
        [--palette K] [--seed S] [--strict] [--quiet]

writes DIR/<kind>/ (e.g. DIR/text/). Train all three into the same DIR and pass it to
prepare_data.py --tokenizers DIR. Lines without the modality are ignored; bad lines
are skipped and reported (--strict: the first one is an error, exit status 2).
`--palette K` trains the image tokenizer in two-tone mode (images drawn in two colours,
like the embedded painted digits; megamm/tokenizers/image.py) with a K-colour palette.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from megamm.tokenizers import (AudioCodecConfig, AudioTokenizer, AudioTrainConfig, ImageTokenizer,
                               ImageTokenizerConfig, ImageTrainConfig, TextTokenizer)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_data import BadLine, load_audio, load_image, parse_line  # noqa: E402  (sibling tool)


class TrainError(Exception):
    pass


def read_modality(manifest: Path, kind: str, strict: bool, sample_rate: int = 16000, image_size: int = 28):
    """The `kind` values of every usable line -> (values, [(line, problem)]); images read
    centre-cropped and resized to image_size (prepare_data's policy)."""
    if not manifest.is_file():
        raise TrainError(f"manifest not found: {manifest}")
    base = manifest.resolve().parent
    values, problems = [], []
    for line_no, text in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            rec = parse_line(text, line_no)
            if kind not in rec:
                continue
            if kind == "text":
                values.append(rec["text"])
            elif kind == "image":
                image, note = load_image(base / rec["image"], image_size)
                if note and strict:
                    raise BadLine(note)
                values.append(image)
            else:
                audio, note = load_audio(base / rec["audio"], sample_rate)
                if note and strict:
                    raise BadLine(note)
                values.append(audio)
        except BadLine as e:
            if strict:
                raise TrainError(f"{manifest}:{line_no}: {e} (--strict)") from None
            problems.append((line_no, str(e)))
    if not values:
        raise TrainError(f"{manifest}: no usable {kind} examples")
    return values, problems


def train(kind: str, values, args):
    progress = not args.quiet
    if kind == "text":
        return TextTokenizer.train(values, vocab_size=args.vocab_size)
    if kind == "image":
        cfg = ImageTokenizerConfig(image_size=args.image_size, channels=args.channels or 48,
                                   palette_codes=args.palette)
        probe = ImageTokenizer(cfg)
        images = np.concatenate([_resized(probe, im) for im in values])  # [N, S, S, 3]
        train_cfg = ImageTrainConfig(steps=args.steps or 1500, batch_size=args.batch_size or 32, seed=args.seed)
        return ImageTokenizer.train(images, cfg, train_cfg, progress=progress)
    cfg = AudioCodecConfig(channels=args.channels or 128)
    train_cfg = AudioTrainConfig(steps=args.steps or 1500, batch_size=args.batch_size or 16, seed=args.seed)
    return AudioTokenizer.train(values, cfg, train_cfg, progress=progress)


def _resized(tok, image: np.ndarray) -> np.ndarray:
    """One uint8 [H, W, 3] image -> uint8 [1, S, S, 3] at the tokenizer's size."""
    x = tok.to_tensor(image[None])  # resized, in [-1, 1]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("text", "image", "audio"))
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="tokenizer set directory; writes OUT/<kind>/")
    ap.add_argument("--steps", type=int, default=None, help="training steps (image/audio)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--channels", type=int, default=None, help="autoencoder width (image/audio)")
    ap.add_argument("--vocab-size", type=int, default=512, help="text id space (>= 256)")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--palette", type=int, default=0, help="image: two-tone mode with this many palette colours")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        for name in ("steps", "batch_size", "channels"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
        values, problems = read_modality(args.manifest, args.kind, args.strict, image_size=args.image_size)
        try:
            tok = train(args.kind, values, args)
        except ValueError as e:  # config problems: sizes, vocab, too little audio
            raise TrainError(str(e)) from None
        tok.save(args.out / args.kind)
    except TrainError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"trained {tok!r} on {len(values)} examples -> {args.out / args.kind}")
    if problems:
        print(f"skipped {len(problems)} line(s):")
        for line_no, msg in problems[:20]:
            print(f"  line {line_no}: {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
