import numpy as np
import pytest

from megamm.config import VocabConfig
from megamm.data.loader import DataError, PackedLoader, open_split
from megamm.data import shards
from megamm.data.shards import ShardError, ShardReader, ShardWriter
from megamm.data.synthetic import write_synthetic_dataset
from megamm.vocab import Vocab

VOCAB = VocabConfig(text_size=40, n_special=10, image_codes=16, image_tokens=4, audio_codebooks=2,
                    audio_codebook_size=8, pad_multiple=8)


def test_shard_round_trip(tmp_path):
    docs = [[1, 2, 3], [4], list(range(10))]
    with ShardWriter(tmp_path / "train_0", vocab_size=100) as w:
        for d in docs:
            w.add_document(d)
    r = ShardReader(tmp_path / "train_0")
    assert len(r) == 3 and r.n_tokens == 14
    assert [r[i].tolist() for i in range(3)] == docs
    assert not list(tmp_path.glob("*.tmp"))


def test_documents_added_at_once_make_the_same_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 64)
    docs = [list(range(i, 2 * i + 1)) for i in range(1, 30)]
    with ShardWriter(tmp_path / "one", vocab_size=100) as w:
        for d in docs:
            w.add_document(d)
    with ShardWriter(tmp_path / "many", vocab_size=100) as w:
        w.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
        w.add_documents(np.concatenate(docs[10:]).astype(np.uint32), [len(d) for d in docs[10:]])
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"many.{ext}").read_bytes()
    with pytest.raises(ShardError, match="lengths must sum"), ShardWriter(tmp_path / "bad", vocab_size=100) as w:
        w.add_documents([1, 2, 3], [1, 1])


def test_a_failed_writer_leaves_no_shard(tmp_path):
    with pytest.raises(ShardError, match="outside"):
        with ShardWriter(tmp_path / "train_0", vocab_size=10) as w:
            w.add_document([1, 2])
            w.add_document([11])
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    with ShardWriter(tmp_path / "a", vocab_size=100) as w:
        w.add_document([1, 2, 3, 4])
    bin_path = tmp_path / "a.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(ShardError, match=r"a\.bin: truncated"):
        ShardReader(tmp_path / "a")
    (tmp_path / "a.idx").write_bytes(b"garbage!" * 4)
    with pytest.raises(ShardError, match=r"a\.idx: not a megamm index"):
        ShardReader(tmp_path / "a")
    (tmp_path / "a.idx").unlink()
    with pytest.raises(ShardError, match="shard file missing"):
        ShardReader(tmp_path / "a")


def test_out_of_range_ids_are_refused_at_open(tmp_path):
    v = Vocab(VOCAB)
    with ShardWriter(tmp_path / "train_0", vocab_size=10_000) as w:
        w.add_document([v.bos, v.used_size + 5, v.eos])
    with pytest.raises(ShardError, match=f"token id {v.used_size + 5} outside the model vocabulary"):
        open_split(tmp_path, "train", v)


def test_missing_dir_no_shards_and_vocab_mismatch(tmp_path):
    v = Vocab(VOCAB)
    with pytest.raises(DataError, match="data directory not found"):
        open_split(tmp_path / "nope", "train", v)
    with pytest.raises(DataError, match="no 'train' shards"):
        open_split(tmp_path, "train", v)
    write_synthetic_dataset(tmp_path, VocabConfig(text_size=41, n_special=10, image_codes=16, image_tokens=4,
                                                  audio_codebooks=2, audio_codebook_size=8), n_train=4, n_val=1)
    with pytest.raises(DataError, match="another vocabulary .*text_size=41 vs model 40"):
        open_split(tmp_path, "train", v)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(d, VOCAB, n_train=200, n_val=20, seed=3)
    return d


def test_rows_are_packed_whole_documents_that_start_at_bos(data):
    v = Vocab(VOCAB)
    loader = PackedLoader(open_split(data, "train", v), v, seq_len=63, micro_batch=4)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 63)
    assert (x[:, 0] == v.bos).all()
    assert (x[:, 1:] == y[:, :-1]).all()
    for row in np.concatenate([x.numpy(), y[:, -1:].numpy()], 1):
        assert v.grammar_violations(row).numel() == 0


def test_data_parallel_ranks_split_the_global_batch(data):
    v = Vocab(VOCAB)
    shards = open_split(data, "train", v)
    whole = PackedLoader(shards, v, 63, micro_batch=4, seed=5)
    parts = [PackedLoader(shards, v, 63, micro_batch=2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for _ in range(3):
        x, _ = whole.next_batch()
        xs = [p.next_batch()[0] for p in parts]
        assert (x == np.concatenate(xs)).all()


def test_loader_state_resumes_on_the_next_batch_across_epochs(data):
    v = Vocab(VOCAB)
    shards = open_split(data, "train", v)
    a = PackedLoader(shards, v, 63, micro_batch=4, seed=1)
    n = a.steps_per_epoch()
    for _ in range(n - 1):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]  # crosses into epoch 1
    assert a.state.epoch == 1
    b = PackedLoader(shards, v, 63, micro_batch=4, seed=1)
    b.load_state_dict(state)
    for e in expected:
        assert (b.next_batch()[0] == e).all()


def test_loader_state_resumes_on_the_same_row_under_another_micro_batch(data):
    """A resharded run (another micro_batch x dp) continues at the row the saved one reached."""
    v = Vocab(VOCAB)
    shards = open_split(data, "train", v)
    a = PackedLoader(shards, v, 63, micro_batch=4, seed=1)
    for _ in range(2):
        a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()[0]  # rows 8..11
    b = PackedLoader(shards, v, 63, micro_batch=2, seed=1)
    b.load_state_dict(state)
    assert (np.concatenate([b.next_batch()[0], b.next_batch()[0]]) == expected).all()
    c = PackedLoader(shards, v, 63, micro_batch=3, seed=1)
    with pytest.raises(DataError, match="row 8 of epoch 0.*= 3 does not divide"):
        c.load_state_dict(state)


def test_too_small_a_data_set_is_a_clear_error(tmp_path):
    write_synthetic_dataset(tmp_path, VOCAB, n_train=2, n_val=1)
    v = Vocab(VOCAB)
    with pytest.raises(DataError, match="fewer than one step needs"):
        PackedLoader(open_split(tmp_path, "train", v), v, 63, micro_batch=8)
