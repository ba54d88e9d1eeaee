"""Held-out losses of a model on examples that hold a caption, an image and a clip each.

    test_loss_<modality>     nats per target token, the training loss's scope
                             (grammar-restricted by default), per target modality,
                             over text->image, image->text, text->audio and audio->text
                             documents of every example
    test_loss                the same over every target token
    test_nll_nats_per_dim    mean negative log-likelihood per token over the full
                             vocabulary, over the text<->image documents (seed 001's
                             measure: 2.6772 for its 4-layer d128 model)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megamm.generate import MultimodalGenerator
from megamm.media import resample
from megamm.vocab import MODALITY_NAMES


@torch.no_grad()
def test_losses(gen: MultimodalGenerator, data, batch: int = 16, sample_rate: int = 16000) -> dict:
    """The losses of the module doc for `data`: aligned sequences `data.captions` (str),
    `data.images` (uint8 [H, W, 3]) and `data.audio` (float32 [T] at `sample_rate`,
    resampled to the codec's when it differs), encoded with the generator's tokenizers;
    documents longer than the model's context are cut to it."""
    v, model = gen.vocab, gen.model
    rate = gen.tok.audio.sample_rate
    audio = [resample(a, sample_rate, rate) for a in data.audio]
    segs = [(gen.segment_ids("text", c), gen.segment_ids("image", im), gen.segment_ids("audio", a))
            for c, im, a in zip(data.captions, data.images, audio)]
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
