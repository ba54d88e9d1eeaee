#!/usr/bin/env python
"""KV-cache decoding against recomputing the prefix, for one 256-token image.

    python benchmarks/kv_cache_decode.py [--model tiny] [--batch 1] [--threads 1]

Generates a whole image (256 codes + <eoi>) after a caption prompt, greedily, twice:
with megamm.generate.sample (prefill once, then one token per step through the KV
cache) and by running the full forward over the whole prefix at every step. Both give
the same ids (checked). Writes benchmarks/results/kv_cache_decode-<device>.json.
The model is the preset with its vocabulary's image length set to 256 (the `small`
preset's images) and random weights: speed does not depend on training.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from megamm.config import get_preset
from megamm.generate import Sampling, sample
from megamm.model import build_model


@torch.no_grad()
def recompute(model, prompts, n):
    v, allowed = model.vocab, model.vocab.allowed_table()
    ids = torch.tensor(prompts)
    for _ in range(n):
        logits = model(ids)[:, -1]
        state = v.states(ids)[:, -1]
        nxt = logits.masked_fill(~allowed[state], float("-inf")).argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[:, len(prompts[0]):].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = get_preset(args.model)
    vocab = dataclasses.replace(base.vocab, image_tokens=args.image_tokens)
    cfg = dataclasses.replace(base, vocab=vocab, kernels="torch",
                              max_seq_len=max(base.max_seq_len, args.image_tokens + 64))
    model = build_model(cfg, seed=0).eval()
    v = model.vocab
    prompt = [v.bos, *v.text_segment([5, 17, 42, 7, 99, 3]), v.boi]
    prompts = [prompt] * args.batch
    n = args.image_tokens + 1
    sample(model, prompts, [v.eoi], 8, Sampling(temperature=0))  # warm-up
    t0 = time.perf_counter()
    cached = sample(model, prompts, [v.eoi], n, Sampling(temperature=0))
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = recompute(model, prompts, n)
    t_full = time.perf_counter() - t0
    same = cached == full
    result = {
        "benchmark": "kv_cache_decode", "model": args.model, "image_tokens": args.image_tokens,
        "batch": args.batch, "threads": args.threads, "prompt_tokens": len(prompt), "new_tokens": n,
        "kv_cache_s": round(t_cache, 3), "recompute_s": round(t_full, 3), "speedup": round(t_full / t_cache, 2),
        "kv_cache_tokens_per_s": round(n * args.batch / t_cache, 1), "same_ids": same,
        "device": f"cpu ({platform.machine()})", "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/kv_cache_decode.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kv_cache_decode-cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
