#!/usr/bin/env python
"""Quality and speed of the default tokenizers on the held-out split of the embedded
dataset, the first-use build time, and tools/prepare_data.py throughput.

    python benchmarks/tokenizer_quality.py [--cache DIR] [--recipe default|quick]
                                    [--out benchmarks/results/tokenizers-cpu.json]

Without --cache the build runs in a fresh temporary cache, so its time is the
first-use time a newcomer sees. Measures:
  image  PSNR of reconstructions, codebook use, and the accuracy of a digit classifier
         (logistic regression on colour-invariant ink maps of the original train images)
         on held-out originals vs their reconstructions; how readable the digit is from
         the codes alone (logistic regression on one-hot (position, code), trained on two
         colourings of the train digits, scored on the held-out ones)
  audio  SNR and log-mel distance of reconstructed spoken captions (with reference
         points: the same clips band-limited to 4 kHz, and with noise at 20 dB SNR),
         tokens per second, codebook use, encode speed
  text   tokens per caption, exact round trips
  data   prepare_data examples/s with 1 and 2 worker processes
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def ink_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28, 3] -> [N, 196]: each pixel's colour distance from the background
    (median border colour), scaled to [0, 1] per image, pooled 2x2. Colour-invariant."""
    im = images.astype(np.float32)
    border = np.concatenate([im[:, 0], im[:, -1], im[:, :, 0], im[:, :, -1]], axis=1)  # [N, 112, 3]
    bg = np.median(border, axis=1)[:, None, None, :]
    ink = np.linalg.norm(im - bg, axis=-1)
    ink /= ink.max(axis=(1, 2), keepdims=True) + 1e-6
    n = len(images)
    return ink.reshape(n, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(n, -1)


def code_probe_accuracy(image, train, val) -> float:
    """Held-out digit accuracy of a linear classifier on the one-hot (position, code)
    features of `image.encode` (what a model reading the tokens starts from)."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    def onehot(images):
        codes = image.encode(images)  # [N, T]
        n, t = codes.shape
        cols = (np.arange(t)[None] * image.codebook_size + codes).ravel()
        return sparse.csr_matrix((np.ones(n * t), (np.repeat(np.arange(n), t), cols)),
                                 shape=(n, t * image.codebook_size))

    clf = LogisticRegression(C=1.0, max_iter=3000).fit(onehot(train.images), train.digits)
    return float(clf.score(onehot(val.images), val.digits))


def bench_image(toks, val, train_originals, train_two_colourings) -> dict:
    from sklearn.linear_model import LogisticRegression

    from megamm.tokenizers.dsp import psnr_db

    image = toks.image
    start = time.perf_counter()
    codes = image.encode(val.images)
    encode_s = time.perf_counter() - start
    recon = image.decode(codes)
    clf = LogisticRegression(max_iter=3000).fit(ink_features(train_originals.images), train_originals.digits)
    acc_orig = float(clf.score(ink_features(val.images), val.digits))
    acc_recon = float(clf.score(ink_features(recon), val.digits))
    per_image = [psnr_db(a, b) for a, b in zip(val.images, recon)]
    return {
        "heldout_images": len(val.images),
        "psnr_db": round(psnr_db(val.images, recon), 2),
        "psnr_db_worst_image": round(float(np.min(per_image)), 2),
        "codebook": {k: round(v, 3) for k, v in image.codebook_usage(val.images).items()},
        "codebook_size": image.codebook_size,
        "tokens_per_image": image.tokens_per_image,
        "classifier_accuracy_original": round(acc_orig, 4),
        "classifier_accuracy_reconstructed": round(acc_recon, 4),
        "classifier_gap_points": round(100 * (acc_orig - acc_recon), 2),
        "digit_probe_on_codes": round(code_probe_accuracy(image, train_two_colourings, val), 4),
        "encode_images_per_s": round(len(val.images) / encode_s, 1),
        "train_report": image.report,
    }


def bench_audio(toks, val) -> dict:
    from megamm.tokenizers.dsp import mel_distance, resample, snr_db

    audio = toks.audio
    clips = val.audio
    start = time.perf_counter()
    codes = [audio.encode(c[None]) for c in clips]
    encode_s = time.perf_counter() - start
    recon = [audio.decode(c)[0, : a.size] for c, a in zip(codes, clips)]
    seconds = sum(a.size for a in clips) / audio.sample_rate
    rng = np.random.default_rng(0)

    def noisy(a):
        return a + rng.normal(size=a.size).astype(np.float32) * np.sqrt((a ** 2).mean() / 100)

    def mean_mel(fn):
        return round(float(np.mean([mel_distance(a[None], fn(a)[None]) for a in clips[:60]])), 3)

    return {
        "heldout_clips": len(clips),
        "heldout_seconds": round(seconds, 1),
        "snr_db": round(float(np.mean([snr_db(a, r) for a, r in zip(clips, recon)])), 2),
        "mel_distance": round(float(np.mean([mel_distance(a[None], r[None]) for a, r in zip(clips, recon)])), 3),
        "mel_distance_reference": {
            "lowpass_4khz": mean_mel(lambda a: resample(resample(a, 16000, 8000), 8000, 16000)),
            "noise_20db": mean_mel(noisy),
            "other_caption": round(float(np.mean([mel_distance(a[None], b[None])
                                                  for a, b in zip(clips[:60], clips[1:61])])), 3),
        },
        "tokens_per_second": audio.cfg.tokens_per_second,
        "tokens_per_second_measured": round(sum(c.size for c in codes) / seconds, 1),
        "codebooks": [{k: round(v, 3) for k, v in u.items()} for u in audio.codebook_usage(clips)],
        "encode_realtime_factor": round(seconds / encode_s, 1),
        "train_report": audio.report,
    }


def bench_text(toks, val) -> dict:
    lengths = [len(toks.text.encode(c)) for c in val.captions]
    exact = sum(toks.text.decode(toks.text.encode(c)) == c for c in val.captions)
    return {"captions": len(val.captions), "tokens_per_caption_mean": round(float(np.mean(lengths)), 2),
            "tokens_per_caption_max": int(max(lengths)), "exact_round_trips": f"{exact}/{len(val.captions)}",
            "bpe_ids_used": toks.text.tokenizer.get_vocab_size(), "id_space": toks.text.size}


def bench_prepare(tok_dir: Path, workdir: Path) -> dict:
    from megamm.demo.digits import export_manifest

    # train-split examples: only throughput is measured here, and 1,200 lines amortise
    # the worker start-up
    manifest = export_manifest(workdir / "manifest", split="train", colourings=1, limit=1200)
    n = len(manifest.read_text().splitlines())
    out = {"examples": n}
    for workers in (1, 2):
        cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), str(manifest), "--out",
               str(workdir / f"out{workers}"), "--tokenizers", str(tok_dir), "--workers", str(workers), "--quiet"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        rate = float(re.search(r"\(([\d.]+) examples/s\)", proc.stdout).group(1))
        out[f"workers_{workers}"] = {"examples_per_s": rate, "wall_s_including_startup": round(wall, 1)}
    return out


def device_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": model, "cores": len(os.sched_getaffinity(0)),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="reuse this cache (default: a fresh temporary one)")
    ap.add_argument("--recipe", choices=("default", "quick"), default="default")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenizers-cpu.json")
    args = ap.parse_args(argv)

    import sklearn
    import tokenizers as hf_tokenizers

    from megamm.demo.recipe import DefaultDatasetRecipe, ensure_default_dataset
    from megamm.demo.digits import make_split
    from megamm.demo.recipe import ensure_default_tokenizers
    from megamm.tokenizers import Tokenizers

    recipe = DefaultDatasetRecipe() if args.recipe == "default" else DefaultDatasetRecipe.quick()
    result = {
        "benchmark": "tokenizers",
        "command": " ".join(["python", "benchmarks/tokenizer_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "tokenizers": hf_tokenizers.__version__, "scikit-learn": sklearn.__version__},
        "recipe": args.recipe,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        fresh = not any(cache.glob("tokenizers-*")) if cache.exists() else True
        start = time.perf_counter()
        tok_dir = ensure_default_tokenizers(cache, recipe.tokenizers)
        t_tok = time.perf_counter() - start
        ensure_default_dataset(cache, recipe)
        t_all = time.perf_counter() - start
        meta = json.loads((cache / f"digits-{recipe.key()}" / "meta.json").read_text())
        result["first_build"] = ({"tokenizers_s": round(t_tok, 1), "total_s": round(t_all, 1)}
                                 if fresh else "cached (run without --cache to time it)")
        result["default_dataset"] = {k: meta[k] for k in ("documents", "tokens", "tokens_per_modality", "templates")}

        toks = Tokenizers.load(tok_dir)
        val = make_split("val", colourings=2, seed=recipe.seed)
        train_originals = make_split("train", colourings=1, seed=recipe.seed, audio=False)
        train_two = make_split("train", colourings=2, seed=recipe.seed, audio=False)
        print("benchmarking image / audio / text tokenizers ...", file=sys.stderr)
        result["image"] = bench_image(toks, val, train_originals, train_two)
        result["audio"] = bench_audio(toks, val)
        result["text"] = bench_text(toks, val)
        print("benchmarking prepare_data ...", file=sys.stderr)
        result["prepare_data"] = bench_prepare(tok_dir, Path(tmp))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
