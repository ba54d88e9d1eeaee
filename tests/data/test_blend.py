"""Blends of data directories (megamm.data.blend), in process: proportions, determinism,
exact and resharded resumes, the shared-vocabulary refusal, the cached index."""
import numpy as np
import pytest
import torch

from megamm.config import ConfigError, VocabConfig, get_preset
from megamm.data.blend import (
    BlendedLoader,
    blend_index,
    check_shared_vocab,
    parse_blend,
    resolve_sources,
)
from megamm.data.loader import DataError, PackedLoader, open_split
from megamm.data.synthetic import write_synthetic_dataset
from megamm.vocab import Vocab

VOCAB = Vocab(get_preset("tiny").vocab)
SEQ = 64
OTHER_VOCAB = VocabConfig(text_size=300, n_special=12, image_codes=40, image_tokens=9, audio_codebooks=2,
                          audio_codebook_size=32)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two sources of different seeds; the second small, so it cycles its epochs quickly."""
    root = tmp_path_factory.mktemp("blend")
    return [write_synthetic_dataset(root / "a", VOCAB.cfg, n_train=120, n_val=8, seed=0),
            write_synthetic_dataset(root / "b", VOCAB.cfg, n_train=9, n_val=8, seed=1)]


def blended(dirs, weights, mb=1, dp=1, rank=0, block=1 << 12):
    sources = [PackedLoader(open_split(d, "train", VOCAB), VOCAB, SEQ, 1, seed=5) for d in dirs]
    return BlendedLoader(sources, [d.name for d in dirs], weights, mb, rank, dp, block=block)


def rows(loader, steps):
    return [loader.next_batch()[0] for _ in range(steps)]


def test_realised_proportions_follow_the_weights():
    for weights in ([0.7, 0.3], [5, 3, 2], [0.01, 0.99]):
        di, dsi = blend_index(weights, 10_000)
        share = np.bincount(di, minlength=len(weights)) / 10_000
        assert np.abs(share - np.asarray(weights) / sum(weights)).max() < 0.01, (weights, share)
        for k in range(len(weights)):  # each source's samples in order, 0, 1, 2, ...
            assert (dsi[di == k] == np.arange((di == k).sum())).all()
        # "most under-served next": every prefix is within ~1 sample of its share per source
        prefix = np.stack([np.cumsum(di == k) for k in range(len(weights))], 1)
        ideal = np.arange(1, 10_001)[:, None] * (np.asarray(weights) / sum(weights))
        assert np.abs(prefix - ideal).max() <= 1.5


def test_the_loader_draws_the_weights_over_blocks(dirs):
    loader = blended(dirs, [0.7, 0.3], block=1000)
    src, j = loader.draws(0, 10_000)  # ten blocks of the index
    assert abs((src == 0).mean() - 0.7) < 0.01
    assert (j[src == 1] == np.arange((src == 1).sum())).all()  # a source's samples continue across blocks


def test_deterministic_and_sources_cycle_their_own_epochs(dirs):
    a, b = blended(dirs, [0.4, 0.6], mb=2), blended(dirs, [0.4, 0.6], mb=2)
    for x, y in zip(rows(a, 12), rows(b, 12)):
        assert torch.equal(x, y)
    n_b = a.sources[1].rows_of_epoch(0)
    assert a.state_dict()["sources"]["b"]["epoch"] >= 1, n_b  # the small source went round
    # its second epoch is its own epoch-1 plan, not a replay of epoch 0
    assert a.sources[1].rows_of_epoch(1) >= 1


def test_resume_at_sample_k_equals_the_uninterrupted_stream(dirs):
    straight = rows(blended(dirs, [0.5, 0.5], mb=2), 20)
    first = blended(dirs, [0.5, 0.5], mb=2)
    rows(first, 7)
    state = first.state_dict()
    again = blended(dirs, [0.5, 0.5], mb=2)
    again.load_state_dict(state)
    for x, y in zip(rows(again, 13), straight[7:]):
        assert torch.equal(x, y)


def test_a_resharded_resume_continues_the_same_global_stream(dirs):
    """State saved by dp=1 x mb=2 at sample 8, resumed by dp=2 x mb=1 and dp=2 x mb=2: the
    ranks' rows, in rank order, are the uninterrupted single-process stream."""
    stream = torch.cat(rows(blended(dirs, [0.6, 0.4], mb=1), 40))
    first = blended(dirs, [0.6, 0.4], mb=2)
    rows(first, 4)
    state = first.state_dict()
    assert state["samples"] == 8
    for mb, dp in ((1, 2), (2, 2), (4, 1)):
        ranks = [blended(dirs, [0.6, 0.4], mb=mb, dp=dp, rank=r) for r in range(dp)]
        for r in ranks:
            r.load_state_dict(state)
        got = torch.cat([x for _ in range(4) for x in (r.next_batch()[0] for r in ranks)])
        assert torch.equal(got, stream[8: 8 + 4 * mb * dp]), (mb, dp)
    odd = blended(dirs, [0.6, 0.4], mb=3)
    with pytest.raises(DataError, match="does not divide"):
        odd.load_state_dict(state)
    with pytest.raises(DataError, match="resume with the same --data"):
        blended(dirs, [0.5, 0.5]).load_state_dict(state)


def test_last_sources_names_each_rows_source(dirs):
    loader = blended(dirs, [0.5, 0.5], mb=4)
    loader.next_batch()
    src, _ = loader.draws(0, 4)
    assert loader.last_sources.tolist() == src.tolist()


def test_sources_of_another_vocabulary_are_refused(dirs, tmp_path):
    other = write_synthetic_dataset(tmp_path / "other", OTHER_VOCAB, n_train=4, n_val=2, seed=2)
    sources = resolve_sources(["0.5", str(dirs[0]), "0.5", str(other)])
    with pytest.raises(DataError) as e:
        check_shared_vocab(sources, 1024)
    msg = str(e.value)
    assert "\n" not in msg and "cannot blend" in msg and str(other) in msg and "text_size=512 vs other 300" in msg
    check_shared_vocab(resolve_sources(["1", str(dirs[0]), "2", str(dirs[1])]), 1024)  # same vocabulary: fine


def test_data_words_are_checked(dirs, tmp_path):
    assert parse_blend([str(dirs[0])]) == [(1.0, str(dirs[0]))]  # one directory: no blend
    assert parse_blend(["0.7", "A", "0.3", "B"]) == [(0.7, "A"), (0.3, "B")]
    for words, fragment in ((["0.7", "A", "0.3"], "the last weight has no directory"),
                            (["x", "A", "1", "B"], "weight 'x' (before A) is not a number"),
                            (["0", "A", "1", "B"], "weight 0 (of A) must be a positive number"),
                            (["-1", "A", "1", "B"], "must be a positive number"),
                            (["nan", "A", "1", "B"], "must be a positive number")):
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            parse_blend(words)
    with pytest.raises(ConfigError, match="directory not found: .*nowhere"):
        resolve_sources(["1", str(dirs[0]), "1", str(tmp_path / "nowhere")])
    same = resolve_sources(["1", str(dirs[0]), "1", str(dirs[0])])
    assert [s.name for s in same] == ["a", "a_2"]


def test_the_index_is_cached_and_rebuilt_when_a_source_changes_or_is_damaged(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", VOCAB.cfg, n_train=30, n_val=4, seed=0)
    b = write_synthetic_dataset(tmp_path / "b", VOCAB.cfg, n_train=30, n_val=4, seed=1)
    first = rows(blended([a, b], [0.5, 0.5], mb=2), 6)
    made = sorted((a / ".cache").glob("blend-*.json"))
    assert len(made) == 1
    npy = made[0].with_suffix(".dataset_index.npy")
    data = bytearray(npy.read_bytes())
    data[-1] ^= 1  # a flipped source id
    npy.write_bytes(bytes(data))
    again = rows(blended([a, b], [0.5, 0.5], mb=2), 6)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert npy.read_bytes() != bytes(data)  # rebuilt
    write_synthetic_dataset(b, VOCAB.cfg, n_train=31, n_val=4, seed=3)  # the source changes
    rows(blended([a, b], [0.5, 0.5], mb=2), 1)
    assert len(sorted((a / ".cache").glob("blend-*.json"))) == 2


def test_one_directory_is_no_blend(dirs):
    """--data DIR stays a plain path (the loop then builds today's PackedLoader), and a
    PackedLoader refuses a blend's saved position."""
    from megamm.train.args import parse

    assert parse(["--data", str(dirs[0])]).data == str(dirs[0])
    assert parse(["--data", "0.7", "A", "0.3", "B"]).data == ("0.7", "A", "0.3", "B")
    state = blended(dirs, [0.5, 0.5]).state_dict()
    single = PackedLoader(open_split(dirs[0], "train", VOCAB), VOCAB, SEQ, 1)
    with pytest.raises(DataError, match="trained on a blend of a, b"):
        single.load_state_dict(state)


def test_sources_are_named_by_directory_but_never_as_another_metric(tmp_path):
    """tokens_<name>, loss_<name>, val_loss_<name>: a source in data/text would report as
    the text modality (loss_text), one in data/per_s as tokens_per_s; they get `_data`."""
    for name in ("text", "audio", "per_s", "a", "x/a"):
        (tmp_path / name).mkdir(parents=True)
    names = [s.name for s in resolve_sources(["1", str(tmp_path / "text"), "1", str(tmp_path / "audio"),
                                              "1", str(tmp_path / "per_s"), "1", str(tmp_path / "a"),
                                              "1", str(tmp_path / "x" / "a")])]
    assert names == ["text_data", "audio_data", "per_s_data", "a", "a_2"]
