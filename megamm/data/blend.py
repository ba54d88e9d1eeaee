"""Blends of prepared data directories: `--data 0.7 DIR_A 0.3 DIR_B` (Megatron's weight
and directory pairs). One bare DIR (or one pair) is no blend: megamm.data.loader's
PackedLoader reads it exactly as before.

The blended stream. Global sample g (one packed row of seq_len + 1 tokens) is

    source  k = dataset_index[g % N]
    sample  j = (g // N) x counts[k] + dataset_sample_index[g % N]   of source k

an index of N = BLOCK samples repeated block after block; counts[k] is how many samples of
a block come from source k. The block is built by the "most under-served source next"
rule, vectorised: with the weights w normalised to sum 1, source k's j-th sample is due at
(j + 1/2) / w_k; all sources' due times are sorted (ties to the lower source) and the
first N make the block. After any n samples every source has within about one sample of
n x w_k, so the realised proportions follow the weights at every scale. The two arrays
(dataset_index uint8, int16 past 255 sources; dataset_sample_index int64) are cached in
the first source's cache folder (megamm.data.plan: `blend-<hash>`, keyed by every
source's plan key, the weights and N; written atomically, checksummed, rebuilt when stale
or damaged) and memory-mapped.

A source's samples are its own packed rows, epoch after epoch: sample j is row j - base of
its epoch e, base counting the rows of its epochs before e (each epoch its own shuffle
and packing, megamm.data.plan); a source that runs out of rows starts its next epoch,
independently of the others. No row is dropped (PackedLoader drops an epoch's tail that
does not fill a step; a blend mixes sources within a step).

Data parallelism as PackedLoader: global micro-step t uses blended samples
[t*mb*dp, (t+1)*mb*dp), rank r the r-th block of mb. Every rank locates every sample of
the step (index arithmetic; it reads only its own rows), so all ranks' cursors agree.

State (the checkpoint's client_state "loader"): `samples`, the global samples consumed,
and each source's cursor (epoch, base) by name, with the weights. A loader with another
mb x dp resumes on the same next sample when its mb x dp divides `samples`; a loader of
other sources or weights refuses the state.

Names: a source is named by its directory's basename (`_2`, `_3`, ... appended when two
share one; `_data` appended to a modality name or `per_s`, whose metrics exist already:
data/text is `text_data`). metrics.jsonl then has, every step, `tokens_<name>`: the counted
target tokens (those the loss counts) of the step's rows from that source, over all
replicas, and `loss_<name>`, their token-mean training loss; and at each validation
`val_loss_<name>`, the loss on that source's validation split, with `val_loss` their
weight-mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megamm.config import ConfigError
from megamm.data.loader import DataError, PackedLoader, data_vocab
from megamm.data.plan import DataCache
from megamm.vocab import MODALITY_NAMES

RESERVED_NAMES = frozenset(MODALITY_NAMES) | {"per_s"}
"""Directory basenames a source is not named as (its metrics would be others')."""

BLEND_FORMAT = 1
BLOCK = 1 << 16
"""Blended samples per block of the index."""


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    path: Path


def parse_blend(tokens) -> list[tuple[float, str]]:
    """--data's words -> [(weight, dir)]: one DIR is [(1.0, DIR)]; otherwise WEIGHT DIR
    pairs with positive finite weights. Refuses in one line (ConfigError) naming the culprit."""
    tokens = [str(t) for t in ([tokens] if isinstance(tokens, (str, Path)) else tokens)]
    if len(tokens) == 1:
        return [(1.0, tokens[0])]
    if not tokens or len(tokens) % 2:
        raise ConfigError(f"--data takes one directory or WEIGHT DIR pairs; got {len(tokens)} words "
                          f"({' '.join(tokens)}): the last weight has no directory")
    pairs = []
    for w, d in zip(tokens[::2], tokens[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"--data weight {w!r} (before {d}) is not a number; give WEIGHT DIR pairs") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--data weight {w} (of {d}) must be a positive number")
        pairs.append((weight, d))
    return pairs


def resolve_sources(tokens) -> list[Source]:
    """parse_blend's pairs as named Sources, each directory checked to exist (ConfigError)."""
    pairs = parse_blend(tokens)
    seen: dict[str, int] = {}
    out = []
    for weight, d in pairs:
        path = Path(d)
        if not path.is_dir():
            raise ConfigError(f"--data directory not found: {d}")
        base = path.resolve().name or "data"
        if base in RESERVED_NAMES:  # loss_text, tokens_per_s, ... are other metrics already
            base = f"{base}_data"
        seen[base] = seen.get(base, 0) + 1
        out.append(Source(base if seen[base] == 1 else f"{base}_{seen[base]}", weight, path))
    return out


def check_shared_vocab(sources: list[Source], pad_multiple: int) -> None:
    """Refuse (DataError, one line) sources prepared for different vocabularies, naming the
    first source that differs from the first one and the first difference."""
    first = data_vocab(sources[0].path, pad_multiple)
    for s in sources[1:]:
        other = data_vocab(s.path, pad_multiple)
        if (first is None) != (other is None):
            has, lacks = (sources[0].path, s.path) if other is None else (s.path, sources[0].path)
            raise DataError(f"cannot blend {s.path} with {sources[0].path}: {has}/meta.json records a "
                            f"vocabulary and {lacks} has none")
        if first is not None:
            diff = first.layout_difference(other, s.name)
            if diff:
                raise DataError(f"cannot blend {s.path} with {sources[0].path}: they were prepared for "
                                f"different vocabularies ({diff.split(', ')[0]})")


def blend_index(weights, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of n blended samples (see the module
    docstring): due times (j + 1/2) / w_k merged in order, ties to the lower source."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k_n = len(w)
    extra = 2 * k_n + 2  # every sample left out is due after n + 2K + 2, and >= n are due before
    dues, srcs, js = [], [], []
    for k in range(k_n):
        j = np.arange(math.ceil(n * w[k]) + extra, dtype=np.int64)
        dues.append((j + 0.5) / w[k])
        srcs.append(np.full(len(j), k, dtype=np.int64))
        js.append(j)
    due, src, j = np.concatenate(dues), np.concatenate(srcs), np.concatenate(js)
    take = np.lexsort((src, due))[:n]
    return src[take].astype(np.uint8 if k_n <= 255 else np.int16), j[take]


class BlendedLoader:
    """Packed rows of several sources, blended by weight (see the module docstring).
    `sources`: one PackedLoader per source (micro_batch 1, dp 1: used for its plans and rows)."""

    def __init__(self, sources: list[PackedLoader], names: list[str], weights: list[float], micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, block: int = BLOCK):
        if len(sources) > np.iinfo(np.int16).max:
            raise DataError(f"a blend of {len(sources)} sources is more than {np.iinfo(np.int16).max}")
        self.sources, self.names, self.weights = sources, list(names), [float(w) for w in weights]
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.row_len = sources[0].row_len
        key = {"format": BLEND_FORMAT, "sources": [s.plan_key for s in sources], "weights": self.weights,
               "samples": block}
        cache: DataCache = sources[0].cache
        self._index, self._sample = cache.arrays("blend", key, ("dataset_index", "dataset_sample_index"),
                                                 lambda: blend_index(self.weights, block),
                                                 lambda a: len(a[0]) == len(a[1]) == block)
        self.block = block
        self._counts = np.bincount(np.asarray(self._index, dtype=np.int64), minlength=len(sources)).astype(np.int64)
        if (self._counts == 0).any():
            k = int(np.argmin(self._counts))
            raise DataError(f"blend weight {self.weights[k]} of {names[k]} is too small to draw a sample in "
                            f"{block} (weights {self.weights})")
        self.samples = 0
        self._cursor = [(0, 0) for _ in sources]  # per source: (epoch, rows of the epochs before it)
        self.last_sources = np.zeros(0, dtype=np.int64)
        """The source of each row of the last batch next_batch returned, int64 [micro_batch]."""

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.dp_size

    @property
    def shards(self):
        return [r for s in self.sources for r in s.shards]

    def draws(self, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, source sample) of global samples [first, first + n)."""
        g = np.arange(first, first + n, dtype=np.int64)
        block, i = np.divmod(g, self.block)
        src = np.asarray(self._index[i], dtype=np.int64)
        return src, block * self._counts[src] + np.asarray(self._sample[i], dtype=np.int64)

    def _locate(self, k: int, j: int) -> tuple[int, int]:
        """(epoch, row) of source k's sample j, moving its cursor forward past full epochs."""
        epoch, base = self._cursor[k]
        if j < base:
            raise DataError(f"source {self.names[k]}: sample {j} is before its position (epoch {epoch}, "
                            f"row {base} of the stream)")
        while j - base >= (n := self.sources[k].rows_of_epoch(epoch)):
            epoch, base = epoch + 1, base + n
        self._cursor[k] = (epoch, base)
        return epoch, j - base

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [micro_batch, seq_len]; advances the state and sets last_sources."""
        src, j = self.draws(self.samples, self.rows_per_step)
        where = [(k, *self._locate(k, jj)) for k, jj in zip(src.tolist(), j.tolist())]
        mine = where[self.dp_rank * self.micro_batch: (self.dp_rank + 1) * self.micro_batch]
        rows = np.stack([self.sources[k].row(epoch, row) for k, epoch, row in mine])
        self.last_sources = src[self.dp_rank * self.micro_batch: (self.dp_rank + 1) * self.micro_batch]
        self.samples += self.rows_per_step
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"samples": self.samples, "weights": self.weights,
                "sources": {n: {"epoch": e, "base": b} for n, (e, b) in zip(self.names, self._cursor)}}

    def load_state_dict(self, d: dict) -> None:
        """Resume at d's sample (see the module docstring for what must match)."""
        if "sources" not in d:
            raise DataError(f"the checkpoint was trained on one data directory; this run blends "
                            f"{', '.join(self.names)}")
        if list(d["sources"]) != self.names or [float(w) for w in d["weights"]] != self.weights:
            raise DataError(f"the checkpoint's blend is {self._describe(list(d['sources']), d['weights'])}; this "
                            f"run's is {self._describe(self.names, self.weights)}: resume with the same --data")
        samples = int(d["samples"])
        if samples % self.rows_per_step:
            raise DataError(f"the checkpoint's data position is blended sample {samples}, which micro_batch x dp "
                            f"= {self.rows_per_step} does not divide: resume with a micro batch and data-parallel "
                            f"size whose product divides {samples}")
        self.samples = samples
        self._cursor = [(int(c["epoch"]), int(c["base"])) for c in d["sources"].values()]

    @staticmethod
    def _describe(names, weights) -> str:
        return " ".join(f"{w} {n}" for n, w in zip(names, weights))


__all__ = ["BLOCK", "BlendedLoader", "Source", "blend_index", "check_shared_vocab", "parse_blend",
           "resolve_sources"]
