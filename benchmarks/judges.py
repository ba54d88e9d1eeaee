#!/usr/bin/env python
"""Accuracy and cost of the evaluation judges (megamm.demo.judges) on the held-out split
of the embedded dataset, for the default and/or the quick tokenizers.

    python benchmarks/judges.py [--tokenizers default quick] [--cache DIR]
                                [--out benchmarks/results/judges-cpu.json]

For each set of tokenizers (taken from the cache, trained there first if missing) the
judges are trained afresh with the default JudgeRecipe (nothing is read from or
written to the judges' cache), and the record holds:
  training   wall and CPU seconds per judge (the image judge trains in a second process
             when two cores are usable, so wall time overlaps), load average
  heldout    image: digit / foreground / background / all-three accuracy; audio: mean
             word accuracy and fraction of exact transcripts; each on the originals and
             on their round trips through the tokenizers (2 paintings per held-out digit)
  speed      images judged per second, seconds of speech transcribed per second
  robustness each set's judges on inputs unlike their training data: round trips
             with each code replaced by a random one with a probability drawn per
             example from [0, 0.3] (mean 15%: heavier than the judges' own training
             corruption), images with pixel noise (sigma 20 levels), speech with white
             noise at 10 dB SNR, and (with both sets) round trips through the other
             set's tokenizers
Timings on a shared machine swing with its load: the CPU seconds are the steadier figure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(tokenizers, progress: bool) -> tuple[dict, tuple]:
    from megamm.demo.digits import SAMPLE_RATE, make_split
    from megamm.demo.judges import JudgeRecipe, train_judges
    from megamm.runtime import torch_threads

    recipe = JudgeRecipe()
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    image_judge, audio_judge = train_judges(recipe, tokenizers, progress)
    wall = time.perf_counter() - start
    val = make_split("val", colourings=recipe.val_colourings)
    with torch_threads(1):
        t = time.perf_counter()
        image_judge.predict(val.images)
        images_per_s = len(val.images) / (time.perf_counter() - t)
        t = time.perf_counter()
        audio_judge.transcribe(val.audio)
        speech_per_s = sum(a.size for a in val.audio) / SAMPLE_RATE / (time.perf_counter() - t)
    report = {k: image_judge.report[k] for k in ("steps", "train_images", "train_s", "train_cpu_s")}
    areport = {k: audio_judge.report[k] for k in ("steps", "train_clips", "train_s", "train_cpu_s")}
    return {
        "training": {"image": report, "audio": areport, "both_wall_s_including_heldout_eval": round(wall, 1),
                     "load_average_before": load_before,
                     "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "heldout": {"examples": len(val), "image": image_judge.report["heldout"],
                    "audio": audio_judge.report["heldout"]},
        "speed_single_thread": {"images_per_s": round(images_per_s, 1),
                                "speech_seconds_per_s": round(speech_per_s, 1)},
    }, (image_judge, audio_judge)


def robustness(judges, tokenizers, other_tokenizers=None, seed: int = 0) -> dict:
    """Accuracies of `judges` on held-out inputs unlike their training data."""
    from megamm.demo.digits import make_split
    from megamm.demo.audio_judge import roundtrip_audio
    from megamm.demo.captions import word_accuracy
    from megamm.demo.image_judge import roundtrip_images
    from megamm.runtime import torch_threads

    image_judge, audio_judge = judges
    val = make_split("val", colourings=2, seed=seed)
    rng = np.random.default_rng(seed)
    noisy_images = np.clip(val.images + rng.normal(0, 20, val.images.shape), 0, 255).astype(np.uint8)
    noisy_audio = [(a + rng.normal(size=a.size) * np.sqrt((a ** 2).mean() / 10)).astype(np.float32)
                   for a in val.audio]
    with torch_threads(1):
        corrupt_images = roundtrip_images(tokenizers.image, val.images, corrupt=0.3, rng=rng)
        corrupt_audio = roundtrip_audio(tokenizers.audio, val.audio, corrupt=0.3, rng=rng)
        if other_tokenizers is not None:
            foreign_images = roundtrip_images(other_tokenizers.image, val.images)
            foreign_audio = roundtrip_audio(other_tokenizers.audio, val.audio)

    def words(clips):
        acc = [word_accuracy(r, h) for r, h in zip(val.captions, audio_judge.transcribe(clips))]
        return {"word_accuracy": round(float(np.mean(acc)), 4), "exact": round(float(np.mean([a == 1 for a in acc])), 4)}

    def image(images):
        return {k: round(v, 4) for k, v in image_judge.accuracy(images, val.captions).items()}

    out = {"image": {"roundtrip_codes_corrupted_up_to_30pct": image(corrupt_images),
                     "pixel_noise_sigma_20": image(noisy_images)},
           "audio": {"roundtrip_codes_corrupted_up_to_30pct": words(corrupt_audio),
                     "white_noise_10db_snr": words(noisy_audio)}}
    if other_tokenizers is not None:
        out["image"]["other_tokenizers_roundtrip"] = image(foreign_images)
        out["audio"]["other_tokenizers_roundtrip"] = words(foreign_audio)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", nargs="+", choices=("default", "quick"), default=["default", "quick"])
    ap.add_argument("--cache", type=Path, default=None, help="tokenizer cache (default: $MEGAMM_CACHE)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "judges-cpu.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import sklearn

    from megamm.demo.recipe import DefaultTokenizerRecipe, load_default
    from megamm.demo.judges import JudgeRecipe
    from dataclasses import asdict

    result = {
        "benchmark": "judges",
        "command": " ".join(["python", "benchmarks/judges.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "scikit-learn": sklearn.__version__},
        "recipe": asdict(JudgeRecipe()),
    }
    tokenizers, judges = {}, {}
    for name in args.tokenizers:
        tok_recipe = DefaultTokenizerRecipe() if name == "default" else DefaultTokenizerRecipe.quick()
        tokenizers[name] = load_default(args.cache, tok_recipe, progress=not args.quiet)
        print(f"benchmarking the judges for the {name} tokenizers ...", file=sys.stderr)
        record, judges[name] = bench(tokenizers[name], not args.quiet)
        result[f"{name}_tokenizers"] = {"tokenizer_recipe_key": tok_recipe.key(), **record}
    print("robustness ...", file=sys.stderr)
    for name in tokenizers:
        other = next((tokenizers[o] for o in tokenizers if o != name), None)
        result[f"{name}_tokenizers"]["robustness"] = robustness(judges[name], tokenizers[name], other)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def device_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": model, "cores": len(os.sched_getaffinity(0))}


if __name__ == "__main__":
    sys.exit(main())
