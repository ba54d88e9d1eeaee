"""The transformers tokenizer backends (megamm.tokenizers.pretrained): for every class the
installed transformers ships, a tiny random model saved with save_pretrained; megamm's
encode gives exactly the HF model's own codes for the same input, and decode its own
decode output; the megamm folder round-trips; bad folders and settings fail in one line."""
import json

import hf_tiny
import numpy as np
import pytest
import torch
import transformers

from megamm.config import ConfigError
from megamm.tokenizers import Tokenizers, TextTokenizer, load_audio_tokenizer, load_image_tokenizer
from megamm.tokenizers.pretrained import (AUDIO_CLASSES, IMAGE_CLASSES, HFAudioTokenizer, HFImageTokenizer,
                                          PretrainedTokenizerError)

SHIPPED_IMAGE = [c for c in IMAGE_CLASSES if hasattr(transformers, c)]
SHIPPED_AUDIO = [c for c in AUDIO_CLASSES if hasattr(transformers, c)]


def test_the_installed_transformers_ships_the_backends_the_issue_names():
    # pinned by setup.py's transformers requirement; a missing one would silently shrink
    # the parametrised tests below
    assert SHIPPED_IMAGE == list(IMAGE_CLASSES)
    assert SHIPPED_AUDIO == list(AUDIO_CLASSES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_tiny.save(name, root / name) for name in SHIPPED_IMAGE + SHIPPED_AUDIO}


def _images(n=3, seed=0, size=hf_tiny.IMAGE_SIZE):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)  # blocky, so codes differ across the grid


def _hf_image_codes(model, name, x):
    with torch.no_grad():
        if name == "Emu3VQVAE":
            sizes = torch.tensor([list(x.shape[-2:])] * x.shape[0])
            return torch.stack(list(model.encode(x, sizes).image_tokens)).reshape(x.shape[0], -1)
        return model.encode(x).image_tokens.reshape(x.shape[0], -1)


@pytest.mark.parametrize("name", SHIPPED_IMAGE)
def test_image_encode_and_decode_equal_the_hf_models_own(folders, name, tmp_path):
    tok = HFImageTokenizer.from_pretrained(folders[name], image_size=hf_tiny.IMAGE_SIZE, device="cpu")
    images = _images()
    codes = tok.encode(images)
    assert codes.dtype == np.int64 and codes.shape == (3, tok.tokens_per_image)
    assert tok.tokens_per_image == (hf_tiny.IMAGE_SIZE // tok.factor) ** 2
    assert codes.min() >= 0 and codes.max() < tok.codebook_size
    assert len(np.unique(codes)) > 1

    ref = hf_tiny.build(name)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    np.testing.assert_array_equal(codes, _hf_image_codes(ref, name, x).numpy())

    if name == "ChameleonVQVAE":
        assert not tok.can_decode
        with pytest.raises(ValueError, match="encodes only"):
            tok.decode(codes)
    else:
        out = tok.decode(codes)
        assert out.dtype == np.uint8 and out.shape == (3, hf_tiny.IMAGE_SIZE, hf_tiny.IMAGE_SIZE, 3)
        with torch.no_grad():
            c = torch.from_numpy(codes)
            y = ref.decode(c.reshape(3, tok.grid, tok.grid)) if name == "Emu3VQVAE" else ref.decode(c)
        want = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(out.astype(int) - want.astype(int)).max() <= 1  # fp rounding at the .5 boundary only

    tok.save(tmp_path / "image")
    again = load_image_tokenizer(tmp_path / "image", device="cpu")
    assert isinstance(again, HFImageTokenizer) and again.class_name == name
    np.testing.assert_array_equal(again.encode(images), codes)
    info = json.loads((tmp_path / "image" / "megamm_tokenizer.json").read_text())
    assert info["kind"] == "hf_image" and info["image_size"] == hf_tiny.IMAGE_SIZE
    assert info["resize"] == "center_crop_lanczos"


def test_images_of_another_size_are_fitted_like_files(folders):
    from PIL import Image, ImageOps

    tok = HFImageTokenizer.from_pretrained(folders["Emu3VQVAE"], image_size=hf_tiny.IMAGE_SIZE, device="cpu")
    big = _images(2, seed=3, size=64)[:, :, :48]  # 64 x 48, not square
    fitted = np.stack([np.asarray(ImageOps.fit(Image.fromarray(im), (32, 32), method=Image.Resampling.LANCZOS))
                       for im in big])
    np.testing.assert_array_equal(tok.encode(big), tok.encode(fitted))


def _clips(n=2, seconds=0.4, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * hf_tiny.SAMPLE_RATE)) / hf_tiny.SAMPLE_RATE
    return np.stack([0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)
                     for i in range(n)]).astype(np.float32)


@pytest.mark.parametrize("name", SHIPPED_AUDIO)
def test_audio_encode_and_decode_equal_the_hf_models_own(folders, name, tmp_path):
    setting = {"EncodecModel": {"bandwidth": 1.0}, "XcodecModel": {"bandwidth": 0.5},
               "DacModel": {"n_codebooks": 2}, "MimiModel": {"n_codebooks": 3}}.get(name, {})
    tok = HFAudioTokenizer.from_pretrained(folders[name], device="cpu", **setting)
    clips = _clips()
    codes = tok.encode(clips)
    frames = tok.n_frames(clips.shape[1])
    C = tok.n_codebooks
    assert tok.sample_rate == hf_tiny.SAMPLE_RATE
    assert codes.dtype == np.int64 and codes.shape == (2, frames * C)
    assert codes.min() >= 0 and codes.max() < tok.codebook_size

    ref = hf_tiny.build(name)
    wave = torch.from_numpy(clips)[:, None]  # 6400 samples: whole frames of every tiny model
    assert clips.shape[1] % tok.hop == 0
    with torch.no_grad():
        hf = {"EncodecModel": lambda: ref.encode(wave, bandwidth=1.0).audio_codes[0],
              "XcodecModel": lambda: ref.encode(wave, bandwidth=0.5).audio_codes,
              "DacModel": lambda: ref.encode(wave, n_quantizers=2).audio_codes,
              "MimiModel": lambda: ref.encode(wave, num_quantizers=3).audio_codes,
              "WavTokenizerModel": lambda: ref.encode(wave).audio_codes}[name]()
    assert hf.shape == (2, C, frames)
    np.testing.assert_array_equal(codes.reshape(2, frames, C), hf.transpose(1, 2).numpy())  # frame-major

    out = tok.decode(codes)
    assert out.dtype == np.float32 and out.shape == (2, frames * tok.hop)
    with torch.no_grad():
        if name == "EncodecModel":
            y = ref.decode(hf[None], [None]).audio_values
        elif name == "DacModel":
            y = ref.decode(audio_codes=hf).audio_values
        else:
            y = ref.decode(hf).audio_values
    y = y.reshape(2, -1)[:, : frames * tok.hop].clamp(-1, 1).numpy()
    n = y.shape[1]  # DAC's decoder returns a few samples short of frames * hop: megamm zero-pads
    assert n >= frames * tok.hop - tok.hop
    np.testing.assert_allclose(out[:, :n], y, rtol=0, atol=1e-6)
    assert not out[:, n:].any()

    tok.save(tmp_path / "audio")
    again = load_audio_tokenizer(tmp_path / "audio", device="cpu")
    assert isinstance(again, HFAudioTokenizer) and again.n_codebooks == C
    np.testing.assert_array_equal(again.encode(clips), codes)


def test_a_clip_not_a_whole_number_of_frames_is_zero_padded(folders):
    tok = HFAudioTokenizer.from_pretrained(folders["MimiModel"], device="cpu")
    clip = _clips(1, seconds=0.37)
    padded = np.pad(clip, ((0, 0), (0, tok.n_frames(clip.shape[1]) * tok.hop - clip.shape[1])))
    np.testing.assert_array_equal(tok.encode(clip), tok.encode(padded))


def test_a_tokenizer_folder_with_hf_backends_gives_the_vocabulary(folders, tmp_path):
    text = TextTokenizer.train(["a red two", "a blue three"] * 20, vocab_size=300)
    toks = Tokenizers(text, HFImageTokenizer.from_pretrained(folders["JanusVQVAE"], device="cpu"),
                      HFAudioTokenizer.from_pretrained(folders["DacModel"], device="cpu"))
    toks.save(tmp_path / "tok")
    back = Tokenizers.load(tmp_path / "tok")
    v = back.vocab_config()
    assert (v.text_size, v.image_codes, v.image_tokens, v.audio_codebooks, v.audio_codebook_size) == (300, 64, 4, 3, 32)
    assert type(back.image).__name__ == "HFImageTokenizer" and type(back.audio).__name__ == "HFAudioTokenizer"


def test_bad_folders_and_settings_fail_in_one_line(folders, tmp_path):
    cases = []
    bogus = tmp_path / "bert"
    bogus.mkdir()
    (bogus / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    cases.append((lambda: HFImageTokenizer.from_pretrained(bogus), "not a known tokenizer class"))
    cases.append((lambda: HFImageTokenizer.from_pretrained(tmp_path / "missing"), "missing"))
    cases.append((lambda: HFImageTokenizer.from_pretrained(folders["DacModel"]), "audio model"))
    cases.append((lambda: HFAudioTokenizer.from_pretrained(folders["Emu3VQVAE"]), "image model"))
    cases.append((lambda: HFImageTokenizer.from_pretrained(folders["Emu3VQVAE"], image_size=36), "multiple of"))
    cases.append((lambda: HFImageTokenizer.from_pretrained(folders["JanusVQVAE"], image_size=64), "must be 32"))
    cases.append((lambda: HFAudioTokenizer.from_pretrained(folders["EncodecModel"], bandwidth=6.0), "not one of"))
    cases.append((lambda: HFAudioTokenizer.from_pretrained(folders["MimiModel"], n_codebooks=9), r"\[1, 4\]"))
    cases.append((lambda: HFAudioTokenizer.from_pretrained(folders["DacModel"], bandwidth=1.0), "number of codebooks"))
    broken = tmp_path / "broken"
    hf_tiny.save("MimiModel", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    cases.append((lambda: HFAudioTokenizer.from_pretrained(broken), "cannot load MimiModel"))
    for call, pattern in cases:
        with pytest.raises(PretrainedTokenizerError, match=pattern) as e:
            call()
        assert "\n" not in str(e.value), str(e.value)


def test_a_vocabulary_past_int32_is_refused_naming_the_tokenizer():
    class Huge:
        n_codebooks, codebook_size = 32, 2**27

    text = TextTokenizer.train(["a b c"] * 4, vocab_size=256)
    with pytest.raises(ConfigError, match="audio 32 x 134217728"):
        Tokenizers(text, type("I", (), {"codebook_size": 64, "tokens_per_image": 4})(), Huge()).vocab_config()
