"""The loader at scale: packing plans built once into the data's cache folder, memory-
mapped by every rank, rebuilt when stale or damaged; shards checked in full once."""
import json
import threading

import numpy as np
import pytest

from megamm.config import VocabConfig
from megamm.data import plan as plan_mod
from megamm.data.loader import PackedLoader, open_split
from megamm.data.plan import DataCache, build_plan, pack_rows
from megamm.data.shards import ShardReader, ShardWriter
from megamm.vocab import Vocab

VOCAB = VocabConfig(text_size=40, n_special=10, image_codes=16, image_tokens=4, audio_codebooks=2,
                    audio_codebook_size=8, pad_multiple=8)
SEQ = 47


def reference_rows(lengths, row_len):
    """The loop the loader used before its plan was vectorised: next fit, one document at a time."""
    rows, cur, used = [], [], 0
    for d, n in enumerate(lengths):
        n = min(int(n), row_len)
        if used + n > row_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(d)
        used += n
    if cur:
        rows.append(cur)
    return rows


@pytest.mark.parametrize("kind", ["random", "some_longer_than_a_row", "equal_halves", "equal_thirds", "one"])
def test_vectorised_packing_makes_the_rows_of_the_loop(kind):
    rng = np.random.default_rng(7)
    lengths = {"random": rng.integers(1, 40, 3000),
               "some_longer_than_a_row": rng.integers(1, 300, 500),
               "equal_halves": np.full(101, 24),  # two per row: chains from odd starts never meet
               "equal_thirds": np.full(100, 16),
               "one": np.array([5])}[kind]
    bounds = pack_rows(lengths, 48)
    assert [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])] == reference_rows(lengths, 48)


def write_unique_docs(directory, n_docs, n_shards=2, seed=0):
    """Shards whose documents are all different (each starts with its own id, base 50),
    so equal rows are the same row."""
    rng = np.random.default_rng(seed)
    per = -(-n_docs // n_shards)
    for s in range(n_shards):
        with ShardWriter(directory / f"train_{s:05d}", vocab_size=Vocab(VOCAB).used_size) as w:
            for i in range(s * per, min((s + 1) * per, n_docs)):
                head = [i % 50, i // 50 % 50, i // 2500 % 50]
                w.add_document(head + rng.integers(0, 50, int(rng.integers(1, 30))).tolist())
    return directory


@pytest.fixture
def data(tmp_path):
    return write_unique_docs(tmp_path / "data", 600)


def batches(loader, n):
    return [loader.next_batch()[0].numpy() for _ in range(n)]


def loader_for(data, cache_dir=None, micro_batch=4, **kw):
    v = Vocab(VOCAB)
    return PackedLoader(open_split(data, "train", v, cache_dir), v, SEQ, micro_batch, cache_dir=cache_dir, **kw)


def plan_files(data):
    return sorted(p.name for p in (data / ".cache").glob("plan-*"))


def test_the_plan_is_the_loop_over_shuffled_documents(data):
    loader = loader_for(data, seed=3)
    lengths = np.concatenate([r.doc_lengths() for r in loader.shards])
    order = np.random.default_rng([3, 0]).permutation(len(lengths))
    rows = reference_rows(lengths[order], SEQ + 1)
    assert [order[r].tolist() for r in rows] == [loader._order[a:b].tolist()
                                                 for a, b in zip(loader._rows[:-1], loader._rows[1:])]
    assert isinstance(loader._order, np.memmap) and isinstance(loader._rows, np.memmap)


def test_batches_are_the_same_across_instances_and_a_cache_rebuild(data, tmp_path):
    first = batches(loader_for(data, seed=1), 5)
    assert len(plan_files(data)) == 3  # json + order + rows of epoch 0
    again = batches(loader_for(data, seed=1), 5)
    for f in (data / ".cache").glob("plan-*"):
        f.unlink()
    rebuilt = batches(loader_for(data, seed=1), 5)
    elsewhere = batches(loader_for(data, seed=1, cache_dir=tmp_path / "other"), 5)
    assert len(plan_files(data)) == 3
    for b in (again, rebuilt, elsewhere):
        assert all((x == y).all() for x, y in zip(first, b))
    assert not all((x == y).all() for x, y in zip(first, batches(loader_for(data, seed=2), 5)))


def test_a_resume_continues_exactly_across_an_epoch_built_by_another_loader(data):
    a = loader_for(data, seed=4)
    n = a.steps_per_epoch()
    batches(a, n - 2)
    state = a.state_dict()
    expected = batches(a, 5)  # crosses into epoch 1, whose plan `a` builds
    assert a.state.epoch == 1 and len(plan_files(data)) == 6
    for f in (data / ".cache").glob("plan-*"):
        f.unlink()  # the resumed run builds both epochs again
    b = loader_for(data, seed=4)
    b.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(expected, batches(b, 5)))


def test_data_parallel_ranks_get_disjoint_rows_that_make_the_global_batch(data):
    whole = batches(loader_for(data, micro_batch=4, seed=5), 6)
    ranks = [batches(loader_for(data, micro_batch=2, dp_rank=r, dp_size=2, seed=5), 6) for r in range(2)]
    rows = [{tuple(row) for b in rank for row in b} for rank in ranks]
    assert len(rows[0]) == len(rows[1]) == 12 and not rows[0] & rows[1]
    for step in range(6):
        assert (whole[step] == np.concatenate([ranks[0][step], ranks[1][step]])).all()


def test_the_plan_is_rebuilt_after_a_shard_changes(data, tmp_path):
    before = batches(loader_for(data, seed=1), 3)
    write_unique_docs(data, 600, seed=9)  # same names and document count, other contents
    after = batches(loader_for(data, seed=1), 3)
    assert len(plan_files(data)) == 6  # another key: a plan of its own
    fresh = write_unique_docs(tmp_path / "fresh", 600, seed=9)
    assert all((x == y).all() for x, y in zip(after, batches(loader_for(fresh, seed=1), 3)))
    assert not all((x == y).all() for x, y in zip(before, after))


@pytest.mark.parametrize("damage", ["truncate_order", "garbage_rows", "flip_order", "bad_json", "other_key"])
def test_a_damaged_or_stale_plan_is_rebuilt_not_trusted(data, damage):
    expected = batches(loader_for(data, seed=1), 4)
    cache = data / ".cache"
    (meta,) = cache.glob("plan-*.json")
    order, rows = meta.with_suffix(".order.npy"), meta.with_suffix(".rows.npy")
    if damage == "truncate_order":
        order.write_bytes(order.read_bytes()[:-8])
    elif damage == "garbage_rows":
        rows.write_bytes(b"\x93NUMPY garbage" * 10)
    elif damage == "flip_order":  # the right size and a valid header: only the checksum tells
        raw = bytearray(order.read_bytes())
        raw[-1] ^= 1
        order.write_bytes(bytes(raw))
    elif damage == "bad_json":
        meta.write_text("{not json")
    else:  # a json whose key is not the loader's (stands for a hash collision)
        doc = json.loads(meta.read_text())
        doc["key"]["seed"] = 99
        meta.write_text(json.dumps(doc))
    assert all((x == y).all() for x, y in zip(expected, batches(loader_for(data, seed=1), 4)))
    key = json.loads(meta.read_text())["key"]
    assert DataCache(cache, writable=True)._load_arrays(meta.stem, key, ("order", "rows")) is not None  # rebuilt


def test_concurrent_loaders_build_the_plan_once(data, monkeypatch):
    builds = []
    real = plan_mod.build_plan

    def counted(*a, **kw):
        builds.append(1)
        return real(*a, **kw)

    monkeypatch.setattr("megamm.data.loader.build_plan", counted)
    v = Vocab(VOCAB)
    shards = open_split(data, "train", v)
    out = [None] * 4

    def start(i):
        out[i] = batches(PackedLoader(shards, v, SEQ, 4, seed=6), 2)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert all((x == y).all() for o in out[1:] for x, y in zip(out[0], o))
    assert not list((data / ".cache").glob(".*tmp*"))


def test_shards_are_read_in_full_once_then_stamped(data, monkeypatch):
    calls = []
    real = ShardReader.verify
    monkeypatch.setattr(ShardReader, "verify", lambda self: (calls.append(self.prefix.name), real(self))[1])
    v = Vocab(VOCAB)
    first = open_split(data, "train", v)
    assert calls == ["train_00000", "train_00001"]
    stamps = sorted((data / ".cache" / "verified").glob("*.json"))
    assert [p.name for p in stamps] == [f"{r.prefix.name}-{r.idx_checksum:08x}.json" for r in first]
    again = open_split(data, "train", v)
    assert len(calls) == 2 and [r.max_token for r in again] == [r.max_token for r in first]
    stamps[0].write_text(stamps[0].read_text().replace('"max_token": ', '"max_token": 1'))  # damaged stamp
    open_split(data, "train", v)
    assert calls[2:] == ["train_00000"]


def test_an_unwritable_cache_folder_plans_in_memory_with_the_same_batches(data, tmp_path):
    expected = batches(loader_for(data, seed=1), 3)
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning, match="cannot be written"):
        got = batches(loader_for(data, seed=1, cache_dir=tmp_path / "a_file" / "cache"), 3)
    assert all((x == y).all() for x, y in zip(expected, got))


def test_build_plan_keeps_the_loaders_shuffle():
    order, rows = build_plan(np.arange(1, 101), 64, seed=2, epoch=3, shuffle=True)
    assert (order == np.random.default_rng([2, 3]).permutation(100)).all() and order.dtype == np.int32
    assert rows[0] == 0 and rows[-1] == 100
