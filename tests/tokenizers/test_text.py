"""Text tokenizer: exact round trips, the id range, files, determinism."""
import json

import pytest

from megamm.tokenizers import TextTokenizer


def test_heldout_captions_round_trip_exactly(quick_tokenizers, heldout):
    text = quick_tokenizers.text
    for caption in heldout.captions:
        ids = text.encode(caption)
        assert text.decode(ids) == caption
        assert all(0 <= i < text.size for i in ids)


def test_captions_are_a_handful_of_tokens(quick_tokenizers, heldout):
    # six words; a BPE trained on the captions gives each word one token
    lengths = [len(quick_tokenizers.text.encode(c)) for c in heldout.captions]
    assert max(lengths) <= 6


@pytest.mark.parametrize("s", ["Hello, wörld! ✓ 42", "", "  two  spaces\tand\nnewline", "日本語のテキスト"])
def test_any_string_round_trips(quick_tokenizers, s):
    text = quick_tokenizers.text
    assert text.decode(text.encode(s)) == s


def test_size_matches_tiny_vocab(quick_tokenizers):
    assert quick_tokenizers.text.size == 512
    assert quick_tokenizers.text.tokenizer.get_vocab_size() <= 512


def test_save_load_same_ids_and_bytes(quick_tokenizers, heldout, tmp_path):
    text = quick_tokenizers.text
    text.save(tmp_path / "a")
    again = TextTokenizer.load(tmp_path / "a")
    again.save(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert again.size == text.size
    assert [again.encode(c) for c in heldout.captions[:20]] == [text.encode(c) for c in heldout.captions[:20]]


def test_loads_a_plain_tokenizer_json(quick_tokenizers, tmp_path):
    quick_tokenizers.text.tokenizer.save(str(tmp_path / "tokenizer.json"))
    plain = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert plain.encode("dark red two on bright blue") == quick_tokenizers.text.encode("dark red two on bright blue")
    assert plain.size == plain.tokenizer.get_vocab_size()


def test_training_is_deterministic(heldout):
    a = TextTokenizer.train(heldout.captions, vocab_size=300)
    b = TextTokenizer.train(heldout.captions, vocab_size=300)
    assert json.loads(a.tokenizer.to_str()) == json.loads(b.tokenizer.to_str())
    assert a.size == 300


def test_rejects_bad_ids_and_sizes(quick_tokenizers):
    with pytest.raises(ValueError, match="outside"):
        quick_tokenizers.text.decode([512])
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        TextTokenizer.train(["a b"], vocab_size=100)
