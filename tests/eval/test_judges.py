"""The evaluation judges (megamm.demo.judges): caption parsing and word accuracy, the
judges' accuracy on the held-out split (originals and round trips through the quick
tokenizers), garbage input, files and the cache."""
import copy
import itertools

import numpy as np
import pytest
import torch

import megamm.demo.judges as judges_module
from megamm.demo.audio_judge import min_duration_path, roundtrip_audio, word_spans
from megamm.demo.digits import WORDS, load_word_clips
from megamm.demo.image_judge import roundtrip_images
from megamm.demo.judges import (PAINTS, AudioJudge, ImageJudge, JudgeRecipe, caption_fields, heldout_accuracy,
                                load_judges, tokenizer_fingerprint, word_accuracy)
from megamm.tokenizers import ImageTokenizer, Tokenizers

# Floors on the held-out split, with the quick tokenizers and the default JudgeRecipe.
# Measured: image 1.0 / 1.0 / 1.0 (digit / foreground / background) on originals,
# 0.994 / 0.997 / 1.0 on round trips, 0.95 / 0.99 / 1.0 on round trips with up to 10% of
# codes corrupted; audio word accuracy 1.0 on originals, 0.99 on round trips, 0.94 with
# corrupted codes. Untrained judges score about 0.1 (images) and 0.05 (speech).
IMAGE_MIN = 0.95
IMAGE_ROUNDTRIP_MIN = 0.93
AUDIO_MIN = 0.9
AUDIO_ROUNDTRIP_MIN = 0.9
CORRUPT_IMAGE_MIN = 0.85
CORRUPT_AUDIO_MIN = 0.85


def test_caption_fields():
    assert caption_fields("dark green eight on bright cyan") == {
        "digit": 8, "foreground": "dark green", "background": "bright cyan"}
    assert len(PAINTS) == 12 and PAINTS[0] == "dark red" and PAINTS[-1] == "bright magenta"
    for bad in ("", "dark green eight", "dark green eight in bright cyan", "dark green ten on bright cyan",
                "pale green eight on bright cyan", "dark green eight on bright cyan please"):
        with pytest.raises(ValueError, match="caption"):
            caption_fields(bad)


def test_caption_fields_of_every_heldout_caption(heldout):
    fields = [caption_fields(c) for c in heldout.captions]
    assert [f["digit"] for f in fields] == heldout.digits.tolist()
    assert all(f["foreground"].split()[1] != f["background"].split()[1] for f in fields)


def test_word_accuracy():
    ref = "dark green eight on bright cyan"
    assert word_accuracy(ref, ref) == 1.0
    assert word_accuracy(ref, "dark green nine on bright cyan") == pytest.approx(5 / 6)  # substitution
    assert word_accuracy(ref, "dark green on bright cyan") == pytest.approx(5 / 6)  # deletion
    assert word_accuracy(ref, "dark green eight eight on bright cyan") == pytest.approx(6 / 7)  # insertion
    assert word_accuracy(ref, "cyan bright on eight green dark") == pytest.approx(1 / 6)  # order counts
    assert word_accuracy(ref, " ".join(WORDS)) < 0.5  # saying everything is not recovering the caption
    assert word_accuracy(ref, "") == 0.0 and word_accuracy("", "") == 1.0 and word_accuracy("", "on") == 0.0


def test_image_judge_reads_heldout_images(judges, heldout):
    image_judge, _ = judges
    acc = image_judge.accuracy(heldout.images, heldout.captions)
    print("image judge, held-out originals:", acc)
    assert all(acc[k] >= IMAGE_MIN for k in ("digit", "foreground", "background")), acc


def test_audio_judge_transcribes_heldout_speech(judges, heldout):
    _, audio_judge = judges
    hyp = audio_judge.transcribe(heldout.audio)
    acc = np.mean([word_accuracy(r, h) for r, h in zip(heldout.captions, hyp)])
    print("audio judge, held-out originals: word accuracy", acc)
    assert acc >= AUDIO_MIN


def test_judges_read_heldout_roundtrips(judges):
    """Measured while the judges were built (JudgeRecipe.val_colourings = 2 paintings of
    each held-out digit, through the quick tokenizers): see heldout_accuracy, checked
    against an independent count below."""
    image_judge, audio_judge = judges
    image, audio = image_judge.report["heldout"]["roundtrip"], audio_judge.report["heldout"]["roundtrip"]
    print("held-out tokenizer round trips: image", image, "audio", audio)
    assert all(image[k] >= IMAGE_ROUNDTRIP_MIN for k in ("digit", "foreground", "background")), image
    assert audio["word_accuracy"] >= AUDIO_ROUNDTRIP_MIN, audio
    assert image_judge.report["train_s"] > 0 and audio_judge.report["train_cpu_s"] > 0


def test_heldout_accuracy_counts_like_the_judges(judges, heldout):
    image_judge, audio_judge = judges
    out = heldout_accuracy(image_judge, audio_judge, None, colourings=1)
    assert out["examples"] == len(heldout) and set(out["image"]) == {"original"}
    assert out["image"]["original"] == {k: round(v, 4) for k, v in image_judge.accuracy(heldout.images, heldout.captions).items()}
    hyp = audio_judge.transcribe(heldout.audio)
    assert out["audio"]["original"]["word_accuracy"] == round(
        float(np.mean([word_accuracy(r, h) for r, h in zip(heldout.captions, hyp)])), 4)
    assert out["audio"]["original"]["exact"] == round(float(np.mean([r == h for r, h in zip(heldout.captions, hyp)])), 4)


def test_judges_read_roundtrips_with_corrupted_codes(judges, heldout, quick_tokenizers):
    """Round trips with each code replaced by a random one with a probability drawn per
    example from [0, 0.1]: roughly what a model's mistakes do to its outputs."""
    image_judge, audio_judge = judges
    rng = np.random.default_rng(123)
    images = roundtrip_images(quick_tokenizers.image, heldout.images, corrupt=0.1, rng=rng)
    acc = image_judge.accuracy(images, heldout.captions)
    clips = roundtrip_audio(quick_tokenizers.audio, heldout.audio[::2], corrupt=0.1, rng=rng)  # 90 clips
    words = np.mean([word_accuracy(r, h) for r, h in zip(heldout.captions[::2], audio_judge.transcribe(clips))])
    print("held-out round trips, up to 10% of codes corrupted: image", acc, "audio word accuracy", words)
    assert all(acc[k] >= CORRUPT_IMAGE_MIN for k in ("digit", "foreground", "background")), acc
    assert words >= CORRUPT_AUDIO_MIN


def test_garbage_images_do_not_crash(judges):
    image_judge, _ = judges
    rng = np.random.default_rng(0)
    garbage = np.stack([rng.integers(0, 256, (28, 28, 3)), np.zeros((28, 28, 3)), np.full((28, 28, 3), 255),
                        np.full((28, 28, 3), 90)]).astype(np.uint8)
    for images in (garbage, garbage[:1], rng.integers(0, 256, (2, 40, 40, 3)).astype(np.uint8)):
        out = image_judge.predict(images)
        assert len(out) == len(images)
        for p in out:
            assert set(p) == {"digit", "foreground", "background"}
            assert p["digit"] in range(10) and p["foreground"] in PAINTS and p["background"] in PAINTS
    assert image_judge.predict(np.zeros((0, 28, 28, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="shape"):
        image_judge.predict(np.zeros((28, 28, 3), np.uint8))


def test_garbage_audio_does_not_crash(judges):
    _, audio_judge = judges
    rng = np.random.default_rng(0)
    silence, short, empty = np.zeros(32000, np.float32), np.full(10, 0.5, np.float32), np.zeros(0, np.float32)
    noise = (0.3 * rng.normal(size=24000)).astype(np.float32)
    nan = np.full(8000, np.nan, np.float32)
    out = audio_judge.transcribe([silence, noise, short, empty, silence * 0 + 1e-4, nan])
    assert len(out) == 6 and out[0] == "" and out[3] == "" and out[5] == ""
    assert all(w in WORDS for text in out for w in text.split())
    assert audio_judge.transcribe([]) == []
    with pytest.raises(ValueError, match="shape"):
        audio_judge.transcribe([np.zeros((2, 100), np.float32)])


def test_word_spans_find_the_clips_or_refuse(heldout):
    clips = load_word_clips()
    spans = word_spans(heldout.audio[0], heldout.captions[0], clips)
    assert len(spans) == 6 and all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))
    for (start, stop), word in zip(spans, heldout.captions[0].split()):
        assert np.array_equal(heldout.audio[0][start:stop], clips[word])
    other = next(c for c in heldout.captions if c != heldout.captions[0])
    with pytest.raises(ValueError, match="not the spoken caption"):
        word_spans(heldout.audio[0], other, clips)
    with pytest.raises(ValueError, match="not the spoken caption"):
        word_spans(heldout.audio[0] * 0.5, heldout.captions[0], clips)


def test_min_duration_path_is_the_best_allowed_labelling():
    rng = np.random.default_rng(0)

    def allowed(path, min_frames):  # every run but the first lasts long enough
        runs = [[path[0], 0]]
        for label in path:
            runs[-1][1] += label == runs[-1][0]
            if label != runs[-1][0]:
                runs.append([label, 1])
        return all(n >= min_frames[c] for c, n in runs[1:])

    for _ in range(100):
        T, C = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        log_probs = np.log(rng.dirichlet(np.ones(C), T))
        min_frames = rng.integers(1, 4, C)
        best = max(sum(log_probs[t, p[t]] for t in range(T))
                   for p in itertools.product(range(C), repeat=T) if allowed(p, min_frames))
        path = min_duration_path(log_probs, min_frames)
        assert allowed(path.tolist(), min_frames)
        assert sum(log_probs[t, path[t]] for t in range(T)) == pytest.approx(best)
    # a 3-frame blip of class 1 inside class 0 is outvoted when runs must last 4 frames
    probs = np.array([[0.9, 0.1]] * 5 + [[0.4, 0.6]] * 3 + [[0.9, 0.1]] * 5)
    assert min_duration_path(np.log(probs), np.array([4, 4])).tolist() == [0] * 13
    assert min_duration_path(np.log(probs), np.array([1, 1])).tolist() == [0] * 5 + [1] * 3 + [0] * 5


def test_save_load_and_wrong_kind(judges, tmp_path, heldout):
    image_judge, audio_judge = judges
    image_judge.save(tmp_path / "image")
    audio_judge.save(tmp_path / "audio")
    assert ImageJudge.load(tmp_path / "image").predict(heldout.images[:20]) == image_judge.predict(heldout.images[:20])
    assert AudioJudge.load(tmp_path / "audio").transcribe(heldout.audio[:5]) == audio_judge.transcribe(heldout.audio[:5])
    with pytest.raises(ValueError, match="audio_judge"):
        ImageJudge.load(tmp_path / "audio")
    with pytest.raises(FileNotFoundError):
        AudioJudge.load(tmp_path)


def test_second_load_is_a_cache_hit(judges, quick_tokenizers, quick_cache, monkeypatch, heldout):
    def no_training(*args, **kwargs):
        raise AssertionError("load_judges trained again instead of loading the cached judges")

    monkeypatch.setattr(judges_module, "train_judges", no_training)
    image_judge, audio_judge = load_judges(quick_tokenizers, cache_dir=quick_cache, progress=False)
    assert image_judge.predict(heldout.images[:20]) == judges[0].predict(heldout.images[:20])
    assert audio_judge.report == judges[1].report
    key = JudgeRecipe().key(quick_tokenizers)
    assert (quick_cache / f"judges-{key}" / "image" / "model.safetensors").is_file()


def test_cache_key_follows_tokenizer_content_and_recipe(quick_tokenizers):
    model = copy.deepcopy(quick_tokenizers.image.model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    other = Tokenizers(quick_tokenizers.text, ImageTokenizer(quick_tokenizers.image.cfg, model),
                       quick_tokenizers.audio)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(quick_tokenizers)
    assert JudgeRecipe().key(other) != JudgeRecipe().key(quick_tokenizers)
    assert JudgeRecipe().key(quick_tokenizers) == JudgeRecipe().key(quick_tokenizers)
    assert JudgeRecipe(val_colourings=1).key(quick_tokenizers) != JudgeRecipe().key(quick_tokenizers)
