#!/usr/bin/env python
"""Evaluate a megamm checkpoint on the embedded dataset's held-out split.

    python tools/evaluate.py --checkpoint runs/tiny --out runs/tiny/report.json

Writes REPORT.json (held-out losses per modality in nats per token,
test_nll_nats_per_dim, and generation accuracies judged by the project's small
classifiers: text_to_image_digit_acc, text_to_image_color_acc, image_to_text_exact,
text_to_audio_word_acc, audio_to_text_exact), REPORT_samples.png (generated images
with their prompt under each) and REPORT_curve.png (the training curve, when the
checkpoint's save dir holds metrics.jsonl). See megamm/demo/report.py for definitions.
The checkpoint directory is all that is needed (it carries its tokenizers).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from megamm.config import ConfigError
from megamm.demo.report import EvalSettings, evaluate

KEYS = ("test_nll_nats_per_dim", "test_loss_text", "test_loss_image", "test_loss_audio",
        "text_to_image_digit_acc", "text_to_image_color_acc", "image_to_text_exact",
        "audio_to_text_exact", "text_to_audio_word_acc")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="save dir (uses `latest`) or one step dir")
    ap.add_argument("--out", type=Path, required=True, help="report JSON to write")
    ap.add_argument("--examples", type=int, default=60, help="held-out prompts per generation task")
    ap.add_argument("--loss-examples", type=int, default=0,
                    help="held-out examples for the losses (0: all 180)")
    ap.add_argument("--cfg", type=float, default=None,
                    help="guidance scale for text->image and text->audio (default: 2.0 for images, 1.5 for audio)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature for text->image and text->audio (default 0.7)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.examples < 1 or args.loss_examples < 0:
        print(f"evaluate: error: --examples must be >= 1 and --loss-examples >= 0", file=sys.stderr)
        return 2
    overrides = {"seed": args.seed, **({} if args.cfg is None else {"cfg_scale": args.cfg}),
                 **({} if args.temperature is None else {"temperature": args.temperature})}
    base = EvalSettings()
    try:
        image, audio = (replace(s, **overrides) for s in (base.image_sampling, base.audio_sampling))
    except ValueError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    settings = EvalSettings(examples=args.examples, loss_examples=args.loss_examples,
                            image_sampling=image, audio_sampling=audio)
    try:
        report = evaluate(args.checkpoint, args.out, settings, log=lambda m: print(m, file=sys.stderr))
    except (ConfigError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"evaluate: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(json.dumps({k: round(report[k], 4) for k in KEYS if k in report}, indent=1))
    print(f"evaluate: wrote {args.out}, {report['samples_png']}"
          + (f", {report['curve_png']}" if "curve_png" in report else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
