"""Deterministic, resumable, data-parallel loader of packed rows.

Each epoch shuffles the documents (seeded by seed and epoch), packs whole documents
greedily into rows of `seq_len + 1` tokens (padding the tail with `<pad>`; a document
longer than a row keeps its first `seq_len + 1` tokens, a valid grammar prefix), and
deals the rows out: global micro-step t uses rows [t*mb*dp, (t+1)*mb*dp), data-parallel
rank r the r-th block of mb of them. The state is (epoch, micro_step): saved in
checkpoints, it resumes on exactly the next batch. The saved state also counts the rows
of the epoch consumed (`rows` = micro_step x mb x dp), from which a loader with another
mb x dp (a resharded run) resumes on the same next row, when its mb x dp divides it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


def open_split(data_dir, split: str, vocab: Vocab) -> list[ShardReader]:
    data_dir = Path(data_dir)
    recorded = data_vocab(data_dir, vocab.cfg.pad_multiple)
    if recorded is not None:
        diff = recorded.layout_difference(vocab.cfg, "model")
        if diff:
            raise DataError(f"{data_dir} was prepared for another vocabulary ({diff})")
    prefixes = list_shards(data_dir, split)
    if not prefixes:
        raise DataError(f"no '{split}' shards (files {split}*.idx/.bin) in {data_dir}")
    readers = [ShardReader(p) for p in prefixes]
    for r in readers:
        r.check_vocab(vocab.used_size)
    return readers


@dataclass
class LoaderState:
    epoch: int = 0
    micro_step: int = 0


class PackedLoader:
    def __init__(self, shards: list[ShardReader], vocab: Vocab, seq_len: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.shards, self.vocab = shards, vocab
        self.row_len = seq_len + 1
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        lengths = [r.doc_lengths() for r in shards]
        self._doc_len = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._shard_of = np.concatenate([np.full(len(l), i) for i, l in enumerate(lengths)])
        self._local = np.concatenate([np.arange(len(l)) for l in lengths])
        if len(self._doc_len) == 0:
            raise DataError("the data set has no documents")
        self.state = LoaderState()
        self._plan_epoch = -1
        self._rows: list[np.ndarray] = []
        self._plan(0)
        if len(self._rows) < self.rows_per_step:
            raise DataError(f"the data set packs into {len(self._rows)} rows of {self.row_len} tokens, "
                            f"fewer than one step needs ({self.rows_per_step} = micro_batch x dp)")

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.dp_size

    def _plan(self, epoch: int) -> None:
        if self._plan_epoch == epoch:
            return
        n = len(self._doc_len)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        rows, cur, used = [], [], 0
        for d in order:
            L = min(int(self._doc_len[d]), self.row_len)
            if used + L > self.row_len:
                rows.append(np.asarray(cur))
                cur, used = [], 0
            cur.append(d)
            used += L
        if cur:
            rows.append(np.asarray(cur))
        self._rows, self._plan_epoch = rows, epoch

    def steps_per_epoch(self) -> int:
        return len(self._rows) // self.rows_per_step

    def _row_tokens(self, docs: np.ndarray) -> np.ndarray:
        out = np.full(self.row_len, self.vocab.pad, dtype=np.int64)
        at = 0
        for d in docs:
            toks = self.shards[self._shard_of[d]][self._local[d]][: self.row_len - at]
            out[at: at + len(toks)] = toks
            at += len(toks)
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [micro_batch, seq_len]; advances the state."""
        st = self.state
        self._plan(st.epoch)
        if (st.micro_step + 1) * self.rows_per_step > len(self._rows):
            st.epoch, st.micro_step = st.epoch + 1, 0
            self._plan(st.epoch)
        first = st.micro_step * self.rows_per_step + self.dp_rank * self.micro_batch
        rows = np.stack([self._row_tokens(self._rows[i]) for i in range(first, first + self.micro_batch)])
        st.micro_step += 1
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "micro_step": self.state.micro_step,
                "rows": self.state.micro_step * self.rows_per_step}

    def load_state_dict(self, d: dict) -> None:
        """Resume at d's position: its `rows` when recorded, else its micro_step."""
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
