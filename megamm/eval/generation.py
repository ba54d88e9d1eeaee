"""Many generations from one model, a batch of prompts at a time."""
from __future__ import annotations

from dataclasses import replace

from megamm.generate import MultimodalGenerator, Sampling


def generate_batched(gen: MultimodalGenerator, prompts: list[list], to: str, sampling: Sampling,
                     batch: int) -> list:
    """One decoded output (str, uint8 image or float32 clip) per prompt (a list of
    segments), `batch` rows at a time; the batch starting at prompt s samples with seed
    `sampling.seed + s`, so the outputs do not depend on what else is generated."""
    outs = []
    for s in range(0, len(prompts), batch):
        sub = replace(sampling, seed=sampling.seed + s)
        outs += [gen.decode(to, ids) for ids in gen.generate_batch_ids(prompts[s:s + batch], to, sub)]
    return outs
