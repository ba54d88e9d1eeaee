"""The embedded dataset and its cached build: ensure_default_dataset / load_default."""
import json
import time

import numpy as np
import pytest

from megamm.config import PRESETS
from megamm.data.documents import split_document
from megamm.data.shards import ShardReader, list_shards
from megamm.demo import digits
from megamm.demo.audio_judge import word_spans
from megamm.demo.recipe import DefaultDatasetRecipe, build_default_dataset, ensure_default_dataset, load_default
from megamm.tokenizers import load_for_data
from megamm.vocab import Vocab


def test_split_is_disjoint_and_complete():
    train, val = digits.split_indices("train"), digits.split_indices("val")
    assert len(val) == 180 and len(train) == 1617
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(1797))


def test_examples_are_coloured_captioned_and_spoken():
    data = digits.make_split("val", colourings=2)
    assert data.images.shape == (360, 28, 28, 3) and data.images.dtype == np.uint8
    assert set(data.sample_index.tolist()) == set(digits.split_indices("val").tolist())
    for cap, d, img in zip(data.captions[:50], data.digits[:50], data.images[:50]):
        fg_shade, fg, word, on, bg_shade, bg = cap.split()
        assert word == digits.DIGIT_WORDS[d] and on == "on" and fg != bg
        assert np.abs(img[0, 0].astype(int) - digits.paint_rgb(bg_shade, bg)).max() <= 1  # corner = background
    assert all(a.dtype == np.float32 and 2.0 < a.size / 16000 < 4.0 for a in data.audio)
    words = digits.load_word_clips()
    for cap, clip in zip(data.captions[:50], data.audio[:50]):  # every word starts on the codec's frame grid
        assert [start % digits.WORD_GRID for start, _ in word_spans(clip, cap, words)] == [0] * 6
    again = digits.make_split("val", colourings=2, start=100, stop=110)  # a range = a slice
    assert again.captions == data.captions[100:110]
    assert np.array_equal(again.images, data.images[100:110])
    assert all(np.array_equal(a, b) for a, b in zip(again.audio, data.audio[100:110]))


def test_shift_moves_every_colouring_but_the_first_within_the_margin():
    plain = digits.make_split("train", colourings=3, audio=False, stop=60)
    moved = digits.make_split("train", colourings=3, audio=False, stop=60, shift=1)
    assert moved.captions == plain.captions
    assert np.array_equal(moved.images[::3], plain.images[::3])  # first colouring: in place
    offsets = []
    for a, b in zip(plain.images, moved.images):  # a moved digit is the plain one rolled by <= 1 pixel
        match = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if np.array_equal(np.roll(a, (dy, dx), axis=(0, 1)), b)]
        assert match
        offsets.append(match[0])
    assert len(set(offsets[1::3] + offsets[2::3])) >= 5  # the moves vary
    part = digits.make_split("train", colourings=3, audio=False, start=31, stop=40, shift=1)
    assert np.array_equal(part.images, moved.images[31:40])
    with pytest.raises(ValueError, match="shift"):
        digits.make_split("train", shift=3)


def test_speak_puts_word_onsets_on_the_grid():
    words = digits.load_word_clips()
    text = "bright cyan four on dark red"
    free = digits.speak(text, words, np.random.default_rng(3))
    on_grid = digits.speak(text, words, np.random.default_rng(3), grid=640)
    starts = [s for s, _ in word_spans(on_grid, text, words)]
    free_starts = [s for s, _ in word_spans(free, text, words)]
    assert all(s % 640 == 0 for s in starts) and not all(s % 640 == 0 for s in free_starts)
    grown = np.diff(starts) - np.diff(free_starts)  # each gap grows by less than the grid
    assert ((grown >= 0) & (grown < 640)).all() and grown.any()
    with pytest.raises(ValueError, match="grid"):
        digits.speak(text, words, grid=0)


def test_word_clips_cover_every_caption_word():
    clips = digits.load_word_clips()
    assert set(clips) == set(digits.WORDS)
    assert all(0.15 < c.size / 16000 < 1.0 for c in clips.values())


def test_data_dir_is_complete_and_grammar_valid(quick_data_dir):
    meta = json.loads((quick_data_dir / "meta.json").read_text())
    assert meta["vocab"] == {**PRESETS["tiny"].vocab.__dict__}
    vocab = Vocab(PRESETS["tiny"].vocab)
    assert meta["documents"] == {"train": 1617, "val": 180}
    n_tokens = {"text": 0, "image": 0, "audio": 0, "special": 0}
    for split in ("train", "val"):
        (prefix,) = list_shards(quick_data_dir, split)
        reader = ShardReader(prefix)
        assert len(reader) == meta["documents"][split]
        for i in range(len(reader)):
            doc = np.asarray(reader[i], dtype=np.int64)
            assert vocab.grammar_violations(doc).numel() == 0
            for modality, codes in split_document(doc, vocab):
                n_tokens[modality] += codes.size
    assert n_tokens["text"] == meta["tokens_per_modality"]["text"]
    assert n_tokens["image"] == meta["tokens_per_modality"]["image"]
    assert n_tokens["audio"] == meta["tokens_per_modality"]["audio"]
    # every template of the default mix occurs
    assert {"text_image", "image_text", "text_audio", "audio_text", "image"} <= set(meta["templates"])


def test_val_documents_show_only_heldout_digits(quick_data_dir, quick_tokenizers):
    vocab = Vocab(PRESETS["tiny"].vocab)
    (prefix,) = list_shards(quick_data_dir, "val")
    reader = ShardReader(prefix)
    held = digits.make_split("val", colourings=1)
    held_codes = {tuple(c) for c in quick_tokenizers.image.encode(held.images)}
    for i in range(len(reader)):
        for modality, codes in split_document(reader[i], vocab):
            if modality == "image":
                assert tuple(codes.tolist()) in held_codes


def test_second_call_is_a_cache_hit(quick_cache, quick_data_dir):
    start = time.perf_counter()
    again = ensure_default_dataset(quick_cache, DefaultDatasetRecipe.quick(), progress=False)
    assert again == quick_data_dir
    assert time.perf_counter() - start < 2.0
    toks = load_for_data(quick_data_dir)
    assert toks.vocab_config() == PRESETS["tiny"].vocab
    assert load_default(quick_cache, DefaultDatasetRecipe.quick().tokenizers, progress=False).text.size == 512


def test_env_var_selects_the_cache(quick_cache, quick_data_dir, monkeypatch):
    monkeypatch.setenv("MEGAMM_CACHE", str(quick_cache))
    assert ensure_default_dataset(recipe=DefaultDatasetRecipe.quick(), progress=False) == quick_data_dir


def test_rebuild_is_byte_identical(quick_data_dir, quick_tokenizers_dir, tmp_path):
    out = tmp_path / "again"
    build_default_dataset(out, quick_tokenizers_dir, DefaultDatasetRecipe.quick(), progress=False)
    shards = [f for f in sorted(quick_data_dir.iterdir()) if f.suffix in (".bin", ".idx")]
    assert shards  # .cache/ (the loader's plans and stamps, once a run opened it) is no part of the build
    assert sorted(f.name for f in out.iterdir() if f.suffix in (".bin", ".idx")) == [f.name for f in shards]
    for f in shards:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    meta_a = json.loads((quick_data_dir / "meta.json").read_text())
    meta_b = json.loads((out / "meta.json").read_text())
    meta_a.pop("tokenizers"), meta_b.pop("tokenizers")  # relative to a different folder
    assert meta_a == meta_b


def test_recipes_get_their_own_cache_entries():
    a, b = DefaultDatasetRecipe.quick(), DefaultDatasetRecipe()
    assert a.key() != b.key() and a.tokenizers.key() != b.tokenizers.key()
    assert DefaultDatasetRecipe.quick().key() == a.key()
