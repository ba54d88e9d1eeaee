"""Preparation throughput per tokenizer backend: images/s for each image tokenizer and
audio seconds/s for each audio codec, through megamm's wrappers (the code
tools/prepare_data.py runs per chunk), on this machine's CPU (or its GPU when one is
present). The transformers models are the tiny random configs of tests/hf_tiny.py
(their speed says what the wrapper and the model class cost at toy size, not what a
full Emu3 or Mimi costs); megamm's own backends are the embedded data's.

    python benchmarks/prepare_backends.py [--images 256] [--clips 32] [--threads 1]

Results: benchmarks/results/prepare_backends-<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hf_tiny", ROOT / "tests" / "hf_tiny.py")
hf_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_tiny)


def _timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--clips", type=int, default=32, help="clips of --seconds each")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=64, help="images per encode call (prepare_data's image_batch)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (prepare_data's workers use 1 each)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from megamm.demo.recipe import ensure_default_tokenizers
    from megamm.tokenizers import Tokenizers
    from megamm.tokenizers.pretrained import AUDIO_CLASSES, IMAGE_CLASSES, HFAudioTokenizer, HFImageTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    rows = []
    work = Path("/tmp/megamm_prepare_backends")
    own = Tokenizers.load(ensure_default_tokenizers(progress=False))

    def image_row(name, tok):
        s = tok.image_size
        imgs = rng.integers(0, 256, (a.images, s, s, 3), dtype=np.uint8)
        dt = _timed(lambda: [tok.encode(imgs[i:i + a.batch]) for i in range(0, a.images, a.batch)])
        rows.append({"backend": name, "modality": "image", "image_size": s, "tokens_per_image": tok.tokens_per_image,
                     "images_per_s": round(a.images / dt, 1)})
        print(f"{name:>20}: {a.images / dt:9.1f} images/s ({s}x{s} -> {tok.tokens_per_image} codes)")

    def audio_row(name, tok):
        n = int(a.seconds * tok.sample_rate)
        clips = (0.1 * rng.standard_normal((a.clips, n))).astype(np.float32)
        dt = _timed(lambda: [tok.encode(c[None]) for c in clips])  # prepare_data encodes clip by clip
        rows.append({"backend": name, "modality": "audio", "sample_rate": tok.sample_rate,
                     "codebooks": tok.n_codebooks, "audio_seconds_per_s": round(a.clips * a.seconds / dt, 1)})
        print(f"{name:>20}: {a.clips * a.seconds / dt:9.1f} audio s/s ({tok.n_codebooks} codebooks)")

    image_row("megamm (embedded)", own.image)
    for name in IMAGE_CLASSES:
        folder = hf_tiny.save(name, work / name)
        image_row(name, HFImageTokenizer.from_pretrained(folder, image_size=hf_tiny.IMAGE_SIZE, device=device))
    audio_row("megamm (embedded)", own.audio)
    for name in AUDIO_CLASSES:
        folder = hf_tiny.save(name, work / name)
        audio_row(name, HFAudioTokenizer.from_pretrained(folder, device=device))

    import transformers
    result = {
        "benchmark": "prepare_backends", "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/prepare_backends.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": a.threads,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "note": "tiny random transformers configs (tests/hf_tiny.py): wrapper + class overhead at toy size",
        "rows": rows,
    }
    out = a.out or ROOT / "benchmarks" / "results" / f"prepare_backends-{device}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
