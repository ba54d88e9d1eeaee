"""tools/evaluate.py's work: one report on a checkpoint, from the checkpoint alone; and
the samples a training run writes every --sample-interval steps.

Held-out data: the embedded dataset's val split (scikit-learn digits whose index is a
multiple of 10, never seen in training, tokenizers included), encoded with the
checkpoint's own tokenizers.

    test_loss_<modality>, test_loss, test_nll_nats_per_dim
                             held-out losses (megamm/eval/losses.py)

Generation, judged (megamm/demo/judges.py; fractions in [0, 1]):

    text_to_image_digit_acc  the image judge reads the caption's digit in the image
    text_to_image_color_acc  mean over foreground and background of "the judge reads the
                             caption's colour (shade and hue)"
    image_to_text_exact      greedy caption == the true caption, exactly
    audio_to_text_exact      greedy transcript == the spoken caption, exactly
    text_to_audio_word_acc   words of the caption the audio judge hears, in order (longest
                             common subsequence over the longer of the two word counts)

Pictures: `<out stem>_samples.png` (generated images with their prompt under each) and
`<out stem>_curve.png` (the training curve from the run's metrics.jsonl, when found).

Samples (`write_samples` from a checkpoint, `write_samples_from_model` from a live
model; one code path): `stepN.png`, `stepN.txt`, `stepN_audio_K.wav` from the same
held-out prompts every time.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megamm.checkpoint import CheckpointError, load_model, read_meta, tokenizers_dir, verified_checkpoint_dir
from megamm.demo.captions import caption_fields, word_accuracy
from megamm.demo.digits import DigitsData, make_split
from megamm.demo.judges import load_judges
from megamm.demo.pictures import image_grid, line_plot
from megamm.eval.curve import training_curve
from megamm.eval.generation import generate_batched
from megamm.eval.losses import test_losses
from megamm.generate import MultimodalGenerator, Sampling, load_generator, tokenizers_fit
from megamm.media import resample, write_png, write_wav
from megamm.tokenizers import Tokenizers


@dataclass(frozen=True)
class EvalSettings:
    examples: int = 60
    """Held-out examples per generation task (and for the losses: all of them if 0)."""
    loss_examples: int = 0
    batch: int = 30
    image_sampling: Sampling = Sampling(temperature=0.7, top_k=0, cfg_scale=2.0, seed=0)
    audio_sampling: Sampling = Sampling(temperature=0.7, top_k=0, cfg_scale=1.5, seed=0)
    # Chosen on the 5000-step tiny run of benchmarks/results/main_command-cpu.json: at
    # cfg 3 / temperature 1 its clips ran words together (word accuracy 0.27 vs 0.66 here)
    # and image colours drifted (0.74 vs 0.98); digit accuracy was 0.38 vs 0.43.
    text_sampling: Sampling = Sampling(temperature=0)
    grid: int = 16
    """Images in the sample grid."""


def heldout(n: int | None = None) -> DigitsData:
    """The default dataset's own held-out examples (one colouring each), or `n` of them
    spread evenly over the split."""
    data = make_split("val", colourings=1, seed=0)
    if n:
        idx = np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int)
        data = DigitsData(images=data.images[idx], captions=[data.captions[i] for i in idx],
                          digits=data.digits[idx], sample_index=data.sample_index[idx],
                          audio=[data.audio[i] for i in idx])
    return data


JUDGE_RATE = 16000
"""The embedded clips' and the audio judge's sample rate."""


def generation_scores(gen: MultimodalGenerator, data: DigitsData, judges, settings: EvalSettings) -> tuple[dict, dict]:
    """-> (scores, samples) for the four directions on `data`."""
    image_judge, audio_judge = judges
    caps = list(data.captions)
    scores, samples = {}, {}

    images = generate_batched(gen, [[("text", c)] for c in caps], "image", settings.image_sampling, settings.batch)
    preds = image_judge.predict(np.stack(images))
    truth = [caption_fields(c) for c in caps]
    scores["text_to_image_digit_acc"] = float(np.mean([p["digit"] == t["digit"] for p, t in zip(preds, truth)]))
    scores["text_to_image_color_acc"] = float(np.mean(
        [((p["foreground"] == t["foreground"]) + (p["background"] == t["background"])) / 2
         for p, t in zip(preds, truth)]))
    samples["text_to_image"] = (images, caps)

    texts = generate_batched(gen, [[("image", im)] for im in data.images], "text", settings.text_sampling,
                             settings.batch)
    scores["image_to_text_exact"] = float(np.mean([t.strip() == c for t, c in zip(texts, caps)]))
    samples["image_to_text"] = texts

    rate = gen.tok.audio.sample_rate  # a pretrained codec may run at another rate than the 16 kHz data
    texts = generate_batched(gen, [[("audio", resample(a, JUDGE_RATE, rate))] for a in data.audio], "text",
                             settings.text_sampling, settings.batch)
    scores["audio_to_text_exact"] = float(np.mean([t.strip() == c for t, c in zip(texts, caps)]))
    samples["audio_to_text"] = texts

    clips = generate_batched(gen, [[("text", c)] for c in caps], "audio", settings.audio_sampling, settings.batch)
    heard = audio_judge.transcribe([resample(c, rate, JUDGE_RATE) for c in clips])
    scores["text_to_audio_word_acc"] = float(np.mean([word_accuracy(c, h) for c, h in zip(caps, heard)]))
    samples["text_to_audio"] = (clips, heard)
    return scores, samples


def evaluate(checkpoint, out: Path, settings: EvalSettings = EvalSettings(), judges=None, log=print) -> dict:
    """The report of the module doc on `checkpoint` (save dir or step dir), written to
    `out` (JSON, atomically) with its pictures beside it; returns it. `judges` default
    to those trained (once, cached) for the checkpoint's own tokenizers when they are
    megamm's own backends, else to those of the embedded default tokenizers (the judges
    look at pixels and waveforms; a pretrained tokenizer's round trips of 28-pixel digits
    are not what they should learn from)."""
    t0 = time.perf_counter()
    ckpt = verified_checkpoint_dir(checkpoint)
    gen = load_generator(ckpt)
    if judges is None:
        own = gen.tok.image.kind == "image" and gen.tok.audio.kind == "audio"
        judges = load_judges(gen.tok if own else None)
    report: dict = {"checkpoint": str(Path(ckpt).resolve())}
    data = heldout(settings.loss_examples or None)
    log(f"evaluate: held-out losses over {len(data)} examples")
    report.update(test_losses(gen, data))
    data = heldout(settings.examples)
    log(f"evaluate: generating from {len(data)} held-out prompts per direction")
    scores, samples = generation_scores(gen, data, judges, settings)
    report.update(scores)
    report["examples"] = len(data)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images, caps = samples["text_to_image"]
    grid = out.with_name(out.stem + "_samples.png")
    write_png(grid, image_grid(images[:settings.grid], caps[:settings.grid], columns=8))
    report["samples_png"] = str(grid)
    metrics = Path(ckpt).parent / "metrics.jsonl"
    if metrics.is_file():
        curve = out.with_name(out.stem + "_curve.png")
        write_png(curve, line_plot(training_curve(metrics), title="training curve", logy=True))
        report["curve_png"] = str(curve)
    report["samples"] = {"image_to_text": list(zip(data.captions, samples["image_to_text"]))[:8],
                         "audio_to_text": list(zip(data.captions, samples["audio_to_text"]))[:8],
                         "text_to_audio_heard": list(zip(data.captions, samples["text_to_audio"][1]))[:8]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    return report


# ---- samples during training ------------------------------------------------------------------
SAMPLE_PROMPTS = 8
"""Held-out captions of the sample grids --sample-interval writes (the same every time)."""


def write_samples(checkpoint, out_dir: Path, step: int, settings: EvalSettings = EvalSettings()) -> list[Path]:
    """`write_samples_from_model` for the model saved in `checkpoint` (save dir or step
    dir) and the tokenizers it carries."""
    ckpt = verified_checkpoint_dir(checkpoint)
    tok_dir = tokenizers_dir(ckpt, read_meta(ckpt))
    if tok_dir is None:
        raise CheckpointError(f"{ckpt} carries no tokenizers (trained on token shards without them); "
                              "samples need the text, image and audio tokenizers")
    return write_samples_from_model(load_model(ckpt), tok_dir, out_dir, step, settings)


def write_samples_from_model(model: torch.nn.Module, tokenizers_dir: str | Path | None, out_dir: Path, step: int,
                             settings: EvalSettings = EvalSettings()) -> list[Path]:
    """Samples from fixed held-out prompts, generated by `model` (a plain megamm
    Transformer, on any device, e.g. the module a DeepSpeed engine wraps) with the
    tokenizers in `tokenizers_dir`: `stepN.png` (images from captions, the prompt under
    each), `stepN.txt` (captions of held-out images and transcripts of held-out speech,
    next to the truth) and `stepN_audio_K.wav` (speech from captions). Returns the paths.

    Generates in eval mode and leaves every submodule's train/eval mode as it found it.
    Raises ValueError without tokenizers (None: the data carries none) or when they do not
    match the model's vocabulary."""
    if tokenizers_dir is None:
        raise ValueError("samples need the text, image and audio tokenizers, and the data carries none")
    tokenizers = Tokenizers.load(tokenizers_dir)
    if not tokenizers_fit(model.config.vocab, tokenizers):
        raise ValueError(f"the tokenizers at {tokenizers_dir} do not match the model's vocabulary")
    modes = [(m, m.training) for m in model.modules()]
    try:
        return _write_samples(MultimodalGenerator(model, tokenizers), Path(out_dir), step, settings)
    finally:
        for m, training in modes:
            m.training = training


def _write_samples(gen: MultimodalGenerator, out_dir: Path, step: int, settings: EvalSettings) -> list[Path]:
    data = heldout(SAMPLE_PROMPTS)
    caps = list(data.captions)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = generate_batched(gen, [[("text", c)] for c in caps], "image", settings.image_sampling, len(caps))
    png = out_dir / f"step{step}.png"
    write_png(png, image_grid(images, caps, columns=SAMPLE_PROMPTS))
    lines = [f"step {step}", "image -> text (truth | generated):"]
    texts = generate_batched(gen, [[("image", im)] for im in data.images], "text", settings.text_sampling, len(caps))
    lines += [f"  {c} | {t}" for c, t in zip(caps, texts)]
    texts = generate_batched(gen, [[("audio", a)] for a in data.audio], "text", settings.text_sampling, len(caps))
    lines += ["audio -> text (truth | generated):"] + [f"  {c} | {t}" for c, t in zip(caps, texts)]
    (out_dir / f"step{step}.txt").write_text("\n".join(lines) + "\n")
    written = [png, out_dir / f"step{step}.txt"]
    clips = generate_batched(gen, [[("text", c)] for c in caps[:2]], "audio", settings.audio_sampling, 2)
    for k, clip in enumerate(clips):
        written.append(out_dir / f"step{step}_audio_{k}.wav")
        write_wav(written[-1], clip, gen.tok.audio.sample_rate)
    return written
