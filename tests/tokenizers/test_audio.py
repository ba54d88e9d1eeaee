"""Audio tokenizer (RVQ codec): layout, reconstruction quality on held-out spoken
captions, codebook use, files; and the resampler."""
import numpy as np
import pytest

from megamm.config import PRESETS
from megamm.tokenizers import AudioCodecConfig, AudioTokenizer
from megamm.tokenizers.dsp import mel_distance, resample, snr_db
from megamm.vocab import Vocab

# Log-mel L1 distance (nats). The quick recipe's codec reaches ~1.3 on held-out
# captions (the default recipe ~0.72), an untrained one > 3, a different caption ~2.2.
MEL_MAX = 1.8


def _roundtrip(audio_tok, clips):
    out = []
    for a in clips:
        r = audio_tok.decode(audio_tok.encode(a[None]))[0]
        out.append(r[: a.size])
    return out


def test_layout_is_frame_major_with_local_codes(quick_tokenizers, heldout):
    import torch
    import torch.nn.functional as F

    audio = quick_tokenizers.audio
    clip = heldout.audio[0]
    ids = audio.encode(clip[None])
    frames = -(-clip.size // 640)
    assert ids.shape == (1, frames * 4) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 256
    # [f0c0, f0c1, f0c2, f0c3, f1c0, ...]: row f of reshape(frames, 4) is frame f's codes,
    # column j the code of residual codebook j
    with torch.no_grad():
        wave = F.pad(torch.from_numpy(clip)[None], (0, frames * 640 - clip.size))
        z = audio.model.encode_latent(wave)[0]  # [frames, D]
        residual, expected = z, []
        for vq in audio.model.rvq.stages:
            c = vq.nearest(residual)
            residual = residual - vq.codebook[c]
            expected.append(c)
    assert np.array_equal(ids.reshape(frames, 4), torch.stack(expected, 1).numpy())
    out = audio.decode(ids)
    assert out.shape == (1, frames * 640) and out.dtype == np.float32


def test_tokens_per_second(quick_tokenizers):
    cfg = quick_tokenizers.audio.cfg
    assert cfg.hop == 640 and cfg.frames_per_second == 25 and cfg.tokens_per_second == 100


def test_heldout_reconstruction_mel_distance(quick_tokenizers, heldout):
    clips = heldout.audio[:40]
    recon = _roundtrip(quick_tokenizers.audio, clips)
    dist = [mel_distance(a[None], r[None]) for a, r in zip(clips, recon)]
    assert np.mean(dist) <= MEL_MAX
    # the loudness survives: output energy within a factor of 2 of the input's
    ratio = np.mean([np.sqrt((r ** 2).mean() / (a ** 2).mean()) for a, r in zip(clips, recon)])
    assert 0.5 <= ratio <= 2.0


def test_untrained_codec_fails_the_threshold(heldout):
    fresh = AudioTokenizer(AudioCodecConfig(channels=96))
    for vq in fresh.model.rvq.stages:
        vq.codebook.normal_()
    clips = heldout.audio[:5]
    dist = [mel_distance(a[None], r[None]) for a, r in zip(clips, _roundtrip(fresh, clips))]
    assert np.mean(dist) > MEL_MAX + 0.6


def test_reconstruction_is_closer_to_its_own_caption(quick_tokenizers, heldout):
    # the codes carry the content: a clip decodes closer to itself than to another caption
    a, b = heldout.audio[0], heldout.audio[1]
    ra = _roundtrip(quick_tokenizers.audio, [a])[0]
    assert mel_distance(a[None], ra[None]) < mel_distance(b[None], ra[None])


def test_codebooks_are_used(quick_tokenizers, heldout):
    usage = quick_tokenizers.audio.codebook_usage(heldout.audio[:40])
    assert len(usage) == 4
    assert all(u["used_fraction"] >= 0.2 for u in usage)


def test_codes_make_grammar_valid_segments(quick_tokenizers, heldout):
    vocab = Vocab(PRESETS["tiny"].vocab)
    ids = quick_tokenizers.audio.encode(heldout.audio[2][None])[0]
    codes = ids.reshape(-1, 4)
    doc = vocab.document([vocab.audio_segment(codes)])
    assert vocab.grammar_violations(doc).numel() == 0
    assert np.array_equal(vocab.audio_codes(doc[2:-2]), codes)


def test_batch_and_padding(quick_tokenizers, heldout):
    audio = quick_tokenizers.audio
    batch = np.stack([heldout.audio[0][:16000], heldout.audio[1][:16000]])  # 1 s each = 25 frames
    ids = audio.encode(batch)
    assert ids.shape == (2, 100)
    short = audio.encode(np.zeros((1, 1), np.float32))  # one sample -> one padded frame
    assert short.shape == (1, 4)
    assert audio.decode(np.zeros((3, 0), np.int64)).shape == (3, 0)


def test_save_load_round_trip(quick_tokenizers, heldout, tmp_path):
    audio = quick_tokenizers.audio
    audio.save(tmp_path / "a")
    again = AudioTokenizer.load(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in ("model.safetensors", "megamm_tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    clip = heldout.audio[3][None]
    assert np.array_equal(again.encode(clip), audio.encode(clip))


def test_bad_inputs_raise(quick_tokenizers):
    audio = quick_tokenizers.audio
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        audio.encode(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="frames"):
        audio.decode(np.zeros((1, 6), np.int64))
    with pytest.raises(ValueError, match="outside"):
        audio.decode(np.full((1, 4), 300))


@pytest.mark.parametrize("rates", [(22050, 16000), (8000, 16000), (48000, 16000)])
def test_resample_keeps_a_tone(rates):
    src, dst = rates
    f = 440.0
    x = np.sin(2 * np.pi * f * np.arange(src) / src).astype(np.float32)
    y = resample(x, src, dst)
    assert y.size == dst
    ref = np.sin(2 * np.pi * f * np.arange(dst) / dst)
    assert snr_db(ref[200:-200], y[200:-200]) > 40


def test_resample_removes_what_cannot_be_represented():
    x = np.sin(2 * np.pi * 7000 * np.arange(22050) / 22050)  # above 4 kHz Nyquist of 8 kHz
    assert np.abs(resample(x, 22050, 8000)[100:-100]).max() < 0.05
