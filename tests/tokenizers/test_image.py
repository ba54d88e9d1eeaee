"""Image tokenizer (VQ-VAE): shapes, reconstruction quality on held-out digits,
codebook use, resizing, files."""
import numpy as np
import pytest

from megamm.tokenizers import ImageTokenizer, ImageTokenizerConfig
from megamm.tokenizers.dsp import psnr_db
from megamm.vocab import Vocab

# The quick recipe's VQ-VAE (300 steps) reaches ~24.7 dB on held-out digits (the default
# recipe ~30 dB), an untrained one ~10 dB.
PSNR_MIN = 22.0


def test_shapes_and_ranges(quick_tokenizers, heldout):
    image = quick_tokenizers.image
    codes = image.encode(heldout.images[:5])
    assert codes.shape == (5, 49) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 256
    out = image.decode(codes)
    assert out.shape == (5, 28, 28, 3) and out.dtype == np.uint8


def test_heldout_reconstruction_psnr(quick_tokenizers, heldout):
    image = quick_tokenizers.image
    recon = image.decode(image.encode(heldout.images))
    assert psnr_db(heldout.images, recon) >= PSNR_MIN


def test_untrained_tokenizer_fails_the_threshold(heldout):
    # the threshold above means something: a VQ-VAE that learned nothing is far below it
    fresh = ImageTokenizer(ImageTokenizerConfig(channels=32))
    fresh.model.vq.codebook.normal_()
    assert psnr_db(heldout.images, fresh.decode(fresh.encode(heldout.images))) < PSNR_MIN - 5


def test_codebook_is_used(quick_tokenizers, heldout):
    usage = quick_tokenizers.image.codebook_usage(heldout.images)
    assert usage["used_fraction"] >= 0.5
    assert usage["perplexity"] >= 32


def test_any_size_is_resized(quick_tokenizers, heldout):
    image = quick_tokenizers.image
    big = np.repeat(np.repeat(heldout.images[:32], 2, axis=1), 2, axis=2)  # [32, 56, 56, 3]
    codes_big = image.encode(big)
    assert codes_big.shape == (32, 49)
    assert psnr_db(heldout.images[:32], image.decode(codes_big)) >= PSNR_MIN - 2
    odd = image.encode(heldout.images[:4, :25, :27])  # cropped, non-square
    assert odd.shape == (4, 49)


def test_codes_make_grammar_valid_segments(quick_tokenizers, heldout, tiny_vocab):
    codes = quick_tokenizers.image.encode(heldout.images[:3])
    for c in codes:
        doc = tiny_vocab.document([tiny_vocab.image_segment(c)])
        assert tiny_vocab.grammar_violations(doc).numel() == 0
        assert np.array_equal(tiny_vocab.image_codes(doc[2:-2]), c)


def test_save_load_round_trip(quick_tokenizers, heldout, tmp_path):
    image = quick_tokenizers.image
    image.save(tmp_path / "a")
    again = ImageTokenizer.load(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in ("model.safetensors", "megamm_tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    codes = image.encode(heldout.images[:16])
    assert np.array_equal(again.encode(heldout.images[:16]), codes)
    assert np.array_equal(again.decode(codes), image.decode(codes))


def test_bad_inputs_raise(quick_tokenizers):
    image = quick_tokenizers.image
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        image.encode(np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="49"):
        image.decode(np.zeros((1, 48), np.int64))
    with pytest.raises(ValueError, match="outside"):
        image.decode(np.full((1, 49), 256))


@pytest.fixture(scope="module")
def tiny_vocab():
    from megamm.config import PRESETS

    return Vocab(PRESETS["tiny"].vocab)
