#!/usr/bin/env python
"""Generate captions, images or speech from a megamm checkpoint.

    python tools/generate.py --checkpoint runs/tiny --text "dark green eight on bright cyan" --to image --out eight.png
    python tools/generate.py --checkpoint runs/tiny --image eight.png --to text --out caption.txt
    python tools/generate.py --checkpoint runs/tiny --audio clip.wav --to text --out words.txt
    python tools/generate.py --checkpoint runs/tiny --text "red one on dark blue" --to audio --out one.wav
    python tools/generate.py --checkpoint runs/tiny --unconditional --to image --num-samples 8 --out u.png

Prompt segments (--text, --image, --audio; each may repeat) form the document in the
order given; --to opens the segment to generate. Images: any format Pillow reads, or
.npy, cropped and resized as tools/prepare_data.py does (megamm/media.py); audio: WAV,
FLAC, OGG, ... (soundfile), resampled to the codec's rate. Outputs: PNG
(--to image), 16-bit WAV (--to audio), or captions one per line (--to text, also
printed). With --num-samples N > 1, files are numbered: stem_0.png, stem_1.png, ...
The checkpoint directory is all that is needed (it carries its tokenizers).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamm.config import ConfigError
from megamm.generate import Sampling, load_generator
from megamm.media import MediaError, read_audio, read_image_sized, write_png, write_wav


class _Segment(argparse.Action):
    """Collects --text/--image/--audio into one list, in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        segments = list(getattr(namespace, "segments", None) or [])
        segments.append((self.dest, value))
        namespace.segments = segments


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="save dir (uses `latest`) or one step dir")
    ap.add_argument("--text", action=_Segment, metavar="CAPTION", help="a caption segment")
    ap.add_argument("--image", action=_Segment, metavar="FILE", help="an image segment (JPEG, PNG, ... or .npy)")
    ap.add_argument("--audio", action=_Segment, metavar="FILE", help="a speech segment (WAV, FLAC, OGG, ...)")
    ap.add_argument("--unconditional", action="store_true", help="no prompt: sample from the model alone")
    ap.add_argument("--to", choices=("image", "text", "audio"), required=True, help="modality to generate")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale for image/audio (1 = off)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus cut")
    ap.add_argument("--out", type=Path, required=True, help="output file (PNG / WAV / text)")
    ap.set_defaults(segments=[])
    return ap


def numbered(out: Path, n: int) -> list[Path]:
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"generate: error: {message}", file=sys.stderr)
        return 2

    if args.unconditional and args.segments:
        return fail("--unconditional takes no --text/--image/--audio prompt")
    if not args.unconditional and not args.segments:
        return fail("give a prompt (--text, --image, --audio) or --unconditional")
    if args.num_samples < 1:
        return fail(f"--num-samples must be >= 1, got {args.num_samples}")
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            cfg_scale=args.cfg, seed=args.seed)
        gen = load_generator(args.checkpoint)
        segments = []
        for kind, value in args.segments:
            if kind == "text":
                if not value.strip():
                    return fail("--text: empty caption")
                segments.append(("text", value))
            elif kind == "image":
                image, note = read_image_sized(Path(value), gen.tok.image.image_size)
                if note:
                    print(f"generate: note: {note}", file=sys.stderr)
                segments.append(("image", image))
            else:
                wave, note = read_audio(Path(value), gen.tok.audio.sample_rate)
                if note:
                    print(f"generate: note: {note}", file=sys.stderr)
                segments.append(("audio", wave))
        outputs = gen.generate(segments, args.to, args.num_samples, sampling)
    except (ConfigError, MediaError, ValueError) as e:
        return fail(str(e))
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.to == "text":
            args.out.write_text("".join(f"{c}\n" for c in outputs))
            for c in outputs:
                print(c)
            written = [args.out]
        else:
            written = numbered(args.out, len(outputs))
            for path, o in zip(written, outputs):
                if args.to == "image":
                    write_png(path, o)
                else:
                    write_wav(path, o, gen.tok.audio.sample_rate)
    except OSError as e:
        return fail(f"cannot write {args.out}: {e.strerror or e}")
    print(f"generate: wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
