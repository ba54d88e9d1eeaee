"""Deterministic, resumable, data-parallel loader of packed rows.

Each epoch shuffles the documents (seeded by seed and epoch), packs whole documents
greedily into rows of `seq_len + 1` tokens (next fit: a row is closed when the next
document does not fit; the tail is padded with `<pad>`; a document longer than a row
keeps its first `seq_len + 1` tokens, a valid grammar prefix), and deals the rows out:
global micro-step t uses rows [t*mb*dp, (t+1)*mb*dp), data-parallel rank r the r-th
block of mb of them. The state is (epoch, micro_step): saved in checkpoints, it resumes
on exactly the next batch. The saved state also counts the rows of the epoch consumed
(`rows` = micro_step x mb x dp), from which a loader with another mb x dp (a resharded
run) resumes on the same next row, when its mb x dp divides it.

The shuffle and packing of an epoch (megamm.data.plan: vectorised, the same rows as a
loop over the documents would make) are built once, by the first process to need them,
into the data set's cache folder (`<data>/.cache`, or `cache_dir`), and memory-mapped by
every rank; the shards are checked in full once and then block by block as they are read.

A blend of several data directories (`--data 0.7 DIR_A 0.3 DIR_B`) is megamm.data.blend's
BlendedLoader, which reads each source's rows through a PackedLoader of its own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megamm.data.plan import PLAN_FORMAT, DataCache, build_plan
from megamm.data.shards import ShardError, ShardReader, list_shards
from megamm.config import VOCAB_PADDING_FIELDS, ConfigError, VocabConfig
from megamm.vocab import Vocab


class DataError(ValueError):
    """Data that cannot be used: missing directory, no shards, vocabulary mismatch."""


def read_meta(data_dir) -> dict:
    """A prepared data directory's meta.json ({} when it has none)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: malformed JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: not a JSON object")
    return meta


def data_vocab(data_dir, pad_multiple: int = 1024) -> VocabConfig | None:
    """The unified vocabulary a data directory was prepared for (its meta.json, written
    from its tokenizers), padded to `pad_multiple`; None when meta.json records none."""
    recorded = read_meta(data_dir).get("vocab")
    if not recorded:
        return None
    fields = {k: v for k, v in recorded.items() if k not in VOCAB_PADDING_FIELDS}
    try:
        return VocabConfig(**fields, pad_multiple=pad_multiple)
    except (TypeError, ConfigError) as e:
        raise DataError(f"{Path(data_dir) / 'meta.json'}: unusable vocab ({e})") from None


def open_split(data_dir, split: str, vocab: Vocab, cache_dir=None) -> list[ShardReader]:
    """The split's shards, checked against the vocabulary; each shard is read in full
    once (its verification stamp lives in the cache folder, `cache_dir` or `<data>/.cache`)
    and afterwards checked block by block as it is read."""
    data_dir = Path(data_dir)
    recorded = data_vocab(data_dir, vocab.cfg.pad_multiple)
    if recorded is not None:
        diff = recorded.layout_difference(vocab.cfg, "model")
        if diff:
            raise DataError(f"{data_dir} was prepared for another vocabulary ({diff})")
    prefixes = list_shards(data_dir, split)
    if not prefixes:
        raise DataError(f"no '{split}' shards (files {split}*.idx/.bin) in {data_dir}")
    readers = DataCache.for_data(data_dir, cache_dir).open_shards(prefixes)
    for r in readers:
        r.check_vocab(vocab.used_size)
    return readers


@dataclass
class LoaderState:
    epoch: int = 0
    micro_step: int = 0


class PackedLoader:
    """`cache_dir`: where the packing plans are kept; default `.cache` in the first shard's
    directory (what open_split uses)."""

    def __init__(self, shards: list[ShardReader], vocab: Vocab, seq_len: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, cache_dir=None):
        self.shards, self.vocab = shards, vocab
        self.row_len = seq_len + 1
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self._first_doc = np.concatenate([[0], np.cumsum([len(r) for r in shards], dtype=np.int64)])
        if self._first_doc[-1] == 0:
            raise DataError("the data set has no documents")
        self._cache = DataCache.for_data(shards[0].prefix.parent, cache_dir)
        self._key = {"format": PLAN_FORMAT, "shards": [[r.prefix.name, r.idx_checksum, len(r)] for r in shards],
                     "row_len": self.row_len, "seed": seed, "shuffle": shuffle}
        self.state = LoaderState()
        self._plan_epoch = -1
        self._order = self._rows = np.zeros(1, dtype=np.int64)
        self._plan(0)
        if self.n_rows < self.rows_per_step:
            raise DataError(f"the data set packs into {self.n_rows} rows of {self.row_len} tokens, "
                            f"fewer than one step needs ({self.rows_per_step} = micro_batch x dp)")

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.dp_size

    @property
    def plan_key(self) -> dict:
        """What this loader's plans are keyed by, less the epoch."""
        return dict(self._key)

    @property
    def cache(self) -> DataCache:
        return self._cache

    @property
    def n_rows(self) -> int:
        """Rows of the current plan's epoch."""
        return len(self._rows) - 1

    def _plan(self, epoch: int) -> None:
        """Map epoch's (order, rows) from the cache (building it there if needed); an
        unshuffled loader has one plan for every epoch."""
        epoch = epoch if self.shuffle else 0
        if self._plan_epoch == epoch:
            return

        def build():
            lengths = np.concatenate([r.doc_lengths() for r in self.shards])
            return build_plan(lengths, self.row_len, self.seed, epoch, self.shuffle)

        self._order, self._rows = self._cache.plan({**self._key, "epoch": epoch}, build)
        self._plan_epoch = epoch

    def steps_per_epoch(self) -> int:
        return self.n_rows // self.rows_per_step

    def rows_of_epoch(self, epoch: int) -> int:
        """Rows epoch `epoch`'s plan packs (mapping that plan)."""
        self._plan(epoch)
        return self.n_rows

    def row(self, epoch: int, row: int) -> np.ndarray:
        """Row `row` of epoch `epoch`'s plan, int64 [seq_len + 1] (megamm.data.blend reads
        its sources row by row through this)."""
        self._plan(epoch)
        return self._row_tokens(row)

    def _row_tokens(self, row: int) -> np.ndarray:
        docs = np.asarray(self._order[self._rows[row]: self._rows[row + 1]], dtype=np.int64)
        shard = np.searchsorted(self._first_doc, docs, side="right") - 1
        out = np.full(self.row_len, self.vocab.pad, dtype=np.int64)
        at = 0
        for s, d in zip(shard.tolist(), (docs - self._first_doc[shard]).tolist()):
            toks = self.shards[s][d][: self.row_len - at]
            out[at: at + len(toks)] = toks
            at += len(toks)
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [micro_batch, seq_len]; advances the state."""
        st = self.state
        self._plan(st.epoch)
        if (st.micro_step + 1) * self.rows_per_step > self.n_rows:
            st.epoch, st.micro_step = st.epoch + 1, 0
            self._plan(st.epoch)
        first = st.micro_step * self.rows_per_step + self.dp_rank * self.micro_batch
        rows = np.stack([self._row_tokens(i) for i in range(first, first + self.micro_batch)])
        st.micro_step += 1
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "micro_step": self.state.micro_step,
                "rows": self.state.micro_step * self.rows_per_step}

    def load_state_dict(self, d: dict) -> None:
        """Resume at d's position: its `rows` when recorded, else its micro_step."""
        if "sources" in d:
            raise DataError(f"the checkpoint was trained on a blend of {', '.join(d['sources'])}; this run reads "
                            f"one data directory: resume with the same --data")
        micro_step = int(d["micro_step"])
        if "rows" in d:
            rows = int(d["rows"])
            if rows % self.rows_per_step:
                raise DataError(f"the checkpoint's data position is row {rows} of epoch {d['epoch']}, which "
                                f"micro_batch x dp = {self.rows_per_step} does not divide: resume with a "
                                f"micro batch and data-parallel size whose product divides {rows}")
            micro_step = rows // self.rows_per_step
        self.state = LoaderState(epoch=int(d["epoch"]), micro_step=micro_step)


def validation_batches(shards: list[ShardReader], vocab: Vocab, seq_len: int, micro_batch: int,
                       dp_rank: int, dp_size: int, max_batches: int):
    """The first `max_batches` micro-batches of the (unshuffled) validation split for this rank."""
    loader = PackedLoader(shards, vocab, seq_len, micro_batch, dp_rank, dp_size, shuffle=False)
    n = min(max_batches, loader.steps_per_epoch())
    return [loader.next_batch() for _ in range(n)]


__all__ = ["PackedLoader", "DataError", "ShardError", "data_vocab", "open_split", "read_meta", "validation_batches"]
