"""tools/evaluate.py's work: one report on a checkpoint, from the checkpoint alone.

Held-out data: the embedded dataset's val split (scikit-learn digits whose index is a
multiple of 10, never seen in training, tokenizers included), encoded with the
checkpoint's own tokenizers.

    test_loss_<modality>     nats per target token, the training loss's scope
                             (grammar-restricted by default), per target modality,
                             over text->image, image->text, text->audio and audio->text
                             documents of every held-out example
    test_nll_nats_per_dim    mean negative log-likelihood per token over the full
                             vocabulary, over the text<->image documents (seed 001's
                             measure: 2.6772 for its 4-layer d128 model)

Generation, judged (megamm/eval/judges.py; fractions in [0, 1]):

    text_to_image_digit_acc  the image judge reads the caption's digit in the image
    text_to_image_color_acc  mean over foreground and background of "the judge reads the
                             caption's colour (shade and hue)"
    image_to_text_exact      greedy caption == the true caption, exactly
    audio_to_text_exact      greedy transcript == the spoken caption, exactly
    text_to_audio_word_acc   words of the caption the audio judge hears, in order (longest
                             common subsequence over the longer of the two word counts)

Pictures: `<out stem>_samples.png` (generated images with their prompt under each) and
`<out stem>_curve.png` (the training curve from the run's metrics.jsonl, when found).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megamm.generate import MultimodalGenerator, Sampling
from megamm.vocab import MODALITY_NAMES


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


def heldout(n: int | None = None):
    from megamm.data.digits import make_split

    data = make_split("val", colourings=1, seed=0)  # the default dataset's own held-out examples
    if n:
        idx = np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int)
        data = type(data)(images=data.images[idx], captions=[data.captions[i] for i in idx],
                          digits=data.digits[idx], sample_index=data.sample_index[idx],
                          audio=[data.audio[i] for i in idx])
    return data


# ---- losses -----------------------------------------------------------------------------------
@torch.no_grad()
def test_losses(gen: MultimodalGenerator, data, batch: int = 16) -> dict:
    """Per-modality held-out losses and test_nll_nats_per_dim (see module doc)."""
    v, model = gen.vocab, gen.model
    segs = [(gen.segment_ids("text", c), gen.segment_ids("image", im), gen.segment_ids("audio", a))
            for c, im, a in zip(data.captions, data.images, data.audio)]
    docs = {"text_image": [], "image_text": [], "text_audio": [], "audio_text": []}
    for t, i, a in segs:
        docs["text_image"].append(v.document([t, i]))
        docs["image_text"].append(v.document([i, t]))
        docs["text_audio"].append(v.document([t, a]))
        docs["audio_text"].append(v.document([a, t]))
    sums, counts = torch.zeros(len(MODALITY_NAMES)), torch.zeros(len(MODALITY_NAMES))
    nll, n_tok = 0.0, 0
    for name, rows in docs.items():
        for s in range(0, len(rows), batch):
            chunk = rows[s:s + batch]
            width = min(max(map(len, chunk)), model.config.max_seq_len + 1)
            ids = torch.full((len(chunk), width), v.pad, dtype=torch.long)
            for r, d in enumerate(chunk):
                d = d[:width]
                ids[r, :len(d)] = torch.tensor(d)
            x, y = ids[:, :-1], ids[:, 1:]
            out = model(x, y)
            sums += out.modality_sum.float()
            counts += out.modality_count.float()
            if name in ("text_image", "image_text"):
                logits = model(x).float()
                keep = y != v.pad
                nll += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
                n_tok += int(keep.sum())
    report = {f"test_loss_{m}": float(sums[i] / counts[i]) for i, m in enumerate(MODALITY_NAMES) if counts[i] > 0}
    report["test_loss"] = float(sums.sum() / counts.sum())
    report["test_nll_nats_per_dim"] = nll / max(n_tok, 1)
    return report


# ---- generation -------------------------------------------------------------------------------
def _batched(gen: MultimodalGenerator, prompts: list[list], to: str, sampling: Sampling, batch: int):
    """Generate one output per prompt (prompts: lists of segments), `batch` rows at a time."""
    outs = []
    for s in range(0, len(prompts), batch):
        sub = Sampling(**{**sampling.__dict__, "seed": sampling.seed + s})
        outs += [gen.decode(to, ids) for ids in gen.generate_batch_ids(prompts[s:s + batch], to, sub)]
    return outs


def generation_scores(gen: MultimodalGenerator, data, judges, settings: EvalSettings) -> tuple[dict, dict]:
    """-> (scores, samples) for the four directions on `data`."""
    from megamm.eval.judges import caption_fields, word_accuracy

    image_judge, audio_judge = judges
    caps = list(data.captions)
    scores, samples = {}, {}

    images = _batched(gen, [[("text", c)] for c in caps], "image", settings.image_sampling, settings.batch)
    preds = image_judge.predict(np.stack(images))
    truth = [caption_fields(c) for c in caps]
    scores["text_to_image_digit_acc"] = float(np.mean([p["digit"] == t["digit"] for p, t in zip(preds, truth)]))
    scores["text_to_image_color_acc"] = float(np.mean(
        [((p["foreground"] == t["foreground"]) + (p["background"] == t["background"])) / 2
         for p, t in zip(preds, truth)]))
    samples["text_to_image"] = (images, caps)

    texts = _batched(gen, [[("image", im)] for im in data.images], "text", settings.text_sampling, settings.batch)
    scores["image_to_text_exact"] = float(np.mean([t.strip() == c for t, c in zip(texts, caps)]))
    samples["image_to_text"] = texts

    texts = _batched(gen, [[("audio", a)] for a in data.audio], "text", settings.text_sampling, settings.batch)
    scores["audio_to_text_exact"] = float(np.mean([t.strip() == c for t, c in zip(texts, caps)]))
    samples["audio_to_text"] = texts

    clips = _batched(gen, [[("text", c)] for c in caps], "audio", settings.audio_sampling, settings.batch)
    heard = audio_judge.transcribe(clips)
    scores["text_to_audio_word_acc"] = float(np.mean([word_accuracy(c, h) for c, h in zip(caps, heard)]))
    samples["text_to_audio"] = (clips, heard)
    return scores, samples


def training_curve(metrics: Path):
    """metrics.jsonl -> {series: [(step, value)]} for the losses it holds."""
    series: dict[str, dict[int, float]] = {}
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k in ("loss", "loss_text", "loss_image", "loss_audio", "val_loss"):
            if isinstance(r.get(k), (int, float)) and np.isfinite(r[k]):
                series.setdefault(k, {})[int(r["step"])] = float(r[k])  # a resumed run's last record wins
    return {k: sorted(v.items()) for k, v in series.items()}


def evaluate(checkpoint, out: Path, settings: EvalSettings = EvalSettings(), judges=None, log=print) -> dict:
    from megamm.generate import load_generator
    from megamm.media import image_grid, line_plot, write_png
    from megamm.train.checkpoint import verified_checkpoint_dir

    t0 = time.perf_counter()
    ckpt = verified_checkpoint_dir(checkpoint)
    gen = load_generator(ckpt)
    if judges is None:
        from megamm.eval.judges import load_judges

        judges = load_judges(gen.tok)  # trained (once, cached) for this checkpoint's tokenizers
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


SAMPLE_PROMPTS = 8
"""Held-out captions of the sample grids --sample-interval writes (the same every time)."""


def write_samples(checkpoint, out_dir: Path, step: int, settings: EvalSettings = EvalSettings()) -> list[Path]:
    """Samples from fixed held-out prompts: `stepN.png` (images from captions, the prompt
    under each), `stepN.txt` (captions of held-out images and transcripts of held-out
    speech, next to the truth) and `stepN_audio_K.wav` (speech from captions)."""
    from megamm.generate import load_generator
    from megamm.media import image_grid, write_png, write_wav

    gen = load_generator(checkpoint)
    data = heldout(SAMPLE_PROMPTS)
    caps = list(data.captions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _batched(gen, [[("text", c)] for c in caps], "image", settings.image_sampling, len(caps))
    png = out_dir / f"step{step}.png"
    write_png(png, image_grid(images, caps, columns=SAMPLE_PROMPTS))
    lines = [f"step {step}", "image -> text (truth | generated):"]
    texts = _batched(gen, [[("image", im)] for im in data.images], "text", settings.text_sampling, len(caps))
    lines += [f"  {c} | {t}" for c, t in zip(caps, texts)]
    texts = _batched(gen, [[("audio", a)] for a in data.audio], "text", settings.text_sampling, len(caps))
    lines += ["audio -> text (truth | generated):"] + [f"  {c} | {t}" for c, t in zip(caps, texts)]
    (out_dir / f"step{step}.txt").write_text("\n".join(lines) + "\n")
    written = [png, out_dir / f"step{step}.txt"]
    clips = _batched(gen, [[("text", c)] for c in caps[:2]], "audio", settings.audio_sampling, 2)
    for k, clip in enumerate(clips):
        written.append(out_dir / f"step{step}_audio_{k}.wav")
        write_wav(written[-1], clip, gen.tok.audio.sample_rate)
    return written
