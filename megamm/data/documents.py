"""From examples to grammar-valid documents to shards.

An example holds up to one caption, one image and one audio clip. It becomes one
document by a template, an ordered choice of its modalities:

    text_image   <bos> <bot> caption <eot> <boi> codes <eoi> <eos>   (image from text)
    image_text   <bos> <boi> codes <eoi> <bot> caption <eot> <eos>   (caption an image)
    text_audio / audio_text                                          (speak / transcribe)
    image, text, audio                                               (unconditional)

Seed 001 trained on its two orderings 50/50; `DocumentMix` generalises that to
weights over all templates. Only templates whose modalities an example has are
candidates, renormalised. Caption dropout (for classifier-free guidance) removes
the leading text segment of a text->X document with probability `caption_dropout`,
leaving an unconditional X document.

Each example's choices come from its own RNG, seeded by (seed, example key), so the
documents do not depend on worker count or processing order. `split_document` is the
inverse of `build_document`; `DatasetWriter` writes documents into train/val shards
plus meta.json (used by tools/prepare_data.py and megamm/demo/recipe.py alike).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megamm.data.shards import ShardWriter
from megamm.vocab import MODALITY_NAMES, Vocab

TEMPLATES: dict[str, tuple[str, ...]] = {
    "text_image": ("text", "image"),
    "image_text": ("image", "text"),
    "text_audio": ("text", "audio"),
    "audio_text": ("audio", "text"),
    "image": ("image",),
    "text": ("text",),
    "audio": ("audio",),
}
"""Template name -> the modalities of its segments, in order."""

MODALITIES = ("text", "image", "audio")


def _default_weights() -> dict[str, float]:
    return {"text_image": 1.0, "image_text": 1.0, "text_audio": 0.5, "audio_text": 0.5,
            "image": 0.2, "text": 0.0, "audio": 0.0}


@dataclass(frozen=True)
class DocumentMix:
    """Mixing weights over TEMPLATES and the caption dropout rate."""

    weights: dict[str, float] = field(default_factory=_default_weights)
    caption_dropout: float = 0.1
    """Probability that a text->image or text->audio document loses its caption."""

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(TEMPLATES))
        if unknown:
            raise ValueError(f"unknown template(s) {unknown}; known: {', '.join(TEMPLATES)}")
        bad = [k for k, w in self.weights.items() if not (w >= 0 and np.isfinite(w))]
        if bad:
            raise ValueError(f"template weights must be finite and >= 0: {bad}")
        if sum(self.weights.values()) <= 0:
            raise ValueError("at least one template weight must be > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")

    @classmethod
    def parse(cls, spec: str, caption_dropout: float = 0.1) -> "DocumentMix":
        """"text_image=1,image_text=1,image=0.5" -> weights (unlisted templates get 0)."""
        weights = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"bad mix entry {part!r}: expected NAME=WEIGHT")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"bad weight in mix entry {part!r}") from None
        return cls(weights=weights, caption_dropout=caption_dropout)

    def to_dict(self) -> dict:
        return {"weights": dict(sorted(self.weights.items())), "caption_dropout": self.caption_dropout}


@dataclass
class Example:
    """Raw modalities of one example (any may be None)."""

    text: str | None = None
    image: np.ndarray | None = None
    """uint8 [H, W, 3]"""
    audio: np.ndarray | None = None
    """float32 [T] at the audio tokenizer's sample rate"""


@dataclass
class EncodedExample:
    """Tokenizer-local codes of one example."""

    text: list[int] | None = None
    image: np.ndarray | None = None
    """int64 [N] image codes"""
    audio: np.ndarray | None = None
    """int64 [frames, C] audio codes"""

    @property
    def modalities(self) -> set[str]:
        return {m for m in MODALITIES if getattr(self, m) is not None}


def encode_examples(examples: list[Example], tokenizers, image_batch: int = 64) -> list[EncodedExample]:
    """Run the tokenizers (a megamm.tokenizers.Tokenizers) over `examples`.

    Images of equal shape are encoded in batches of `image_batch` in example order;
    each audio clip is encoded on its own. (Float rounding differs slightly between
    batch shapes, which can flip a rare near-tie code, so the pipelines fix the
    batching and run single-threaded to stay byte-identical.)
    """
    out = [EncodedExample() for _ in examples]
    for ex, enc in zip(examples, out):
        if ex.text is not None:
            enc.text = tokenizers.text.encode(ex.text)
        if ex.audio is not None:
            codes = tokenizers.audio.encode(np.asarray(ex.audio, np.float32)[None])[0]
            enc.audio = codes.reshape(-1, tokenizers.audio.n_codebooks)
    with_image = [i for i, ex in enumerate(examples) if ex.image is not None]
    by_shape: dict[tuple, list[int]] = {}
    for i in with_image:
        by_shape.setdefault(examples[i].image.shape, []).append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), image_batch):
            chunk = idx[s:s + image_batch]
            codes = tokenizers.image.encode(np.stack([examples[i].image for i in chunk]))
            for i, c in zip(chunk, codes):
                out[i].image = c
    return out


def choose_template(modalities: set[str], mix: DocumentMix, rng: np.random.Generator) -> str | None:
    """A template name drawn by weight among those `modalities` can fill, or None."""
    names = [n for n, mods in TEMPLATES.items() if set(mods) <= modalities and mix.weights.get(n, 0) > 0]
    if not names:
        return None
    w = np.array([mix.weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def build_document(ex: EncodedExample, vocab: Vocab, mix: DocumentMix,
                   rng: np.random.Generator) -> tuple[list[int], str] | None:
    """(unified ids of one document, template name), or None when no template fits.

    The name reports what was built: a text->X document whose caption was dropped
    is named after its unconditional remainder ("image" or "audio").
    """
    name = choose_template(ex.modalities, mix, rng)
    if name is None:
        return None
    mods = TEMPLATES[name]
    if len(mods) > 1 and mods[0] == "text" and rng.random() < mix.caption_dropout:
        mods = mods[1:]
        name = "_".join(mods)
    segments = []
    for m in mods:
        if m == "text":
            segments.append(vocab.text_segment(ex.text))
        elif m == "image":
            segments.append(vocab.image_segment(ex.image))
        else:
            segments.append(vocab.audio_segment(ex.audio))
    return vocab.document(segments), name


def split_document(ids, vocab: Vocab) -> list[tuple[str, np.ndarray]]:
    """Inverse of build_document: unified ids of one document -> its segments as
    (modality, tokenizer-local codes): text `[n]`, image `[N]`, audio `[frames, C]`.
    Raises ValueError on a document the grammar rejects."""
    ids = np.asarray(ids, dtype=np.int64)
    bad = vocab.grammar_violations(ids).tolist()
    if bad or ids.size < 2 or ids[0] != vocab.bos or ids[-1] != vocab.eos:
        raise ValueError(f"not a valid document (grammar violations at {bad[:5]})")
    opens = {vocab.bot: ("text", vocab.eot), vocab.boi: ("image", vocab.eoi), vocab.boa: ("audio", vocab.eoa)}
    segments, i = [], 1
    while i < ids.size - 1:
        modality, close = opens[int(ids[i])]
        j = i + 1 + int(np.argmax(ids[i + 1:] == close))
        body = ids[i + 1:j]
        if modality == "text":
            segments.append(("text", body))
        elif modality == "image":
            segments.append(("image", vocab.image_codes(body)))
        else:
            segments.append(("audio", vocab.audio_codes(body)))
        i = j + 1
    return segments


def example_rng(seed: int, key: int) -> np.random.Generator:
    """The RNG of one example's document choices."""
    return np.random.default_rng([int(seed), int(key), 7])


def split_of(seed: int, key: int, val_fraction: float) -> str:
    """"train" or "val" for example `key`, a fixed pseudo-random draw per (seed, key)."""
    return "val" if np.random.default_rng([int(seed), int(key), 11]).random() < val_fraction else "train"


class DocumentCounts:
    """What meta.json counts of written documents: documents and tokens per split, tokens
    per modality, documents per template (a DatasetWriter's, a preparation unit's, or the
    sum of several: `add_counts`)."""

    def __init__(self, vocab: Vocab):
        self._modality = vocab.modality_table().numpy()
        self.documents = {"train": 0, "val": 0}
        self.tokens = {"train": 0, "val": 0}
        self.tokens_per_modality = {name: 0 for name in MODALITY_NAMES}
        self.templates: dict[str, int] = {}

    def add(self, split: str, arr: np.ndarray, template: str | None = None) -> None:
        """One document, int64 ids `arr`, of `split` and `template`."""
        self.documents[split] += 1
        self.tokens[split] += arr.size
        counts = np.bincount(self._modality[arr], minlength=len(MODALITY_NAMES))
        for name, n in zip(MODALITY_NAMES, counts.tolist()):
            self.tokens_per_modality[name] += n
        if template is not None:
            self.templates[template] = self.templates.get(template, 0) + 1

    def to_dict(self) -> dict:
        return {"documents": dict(self.documents), "tokens": dict(self.tokens),
                "tokens_per_modality": dict(self.tokens_per_modality), "templates": dict(self.templates)}

    def add_counts(self, d: dict) -> None:
        """Add another's to_dict()."""
        for key, mine in (("documents", self.documents), ("tokens", self.tokens),
                          ("tokens_per_modality", self.tokens_per_modality), ("templates", self.templates)):
            for name, n in d[key].items():
                mine[name] = mine.get(name, 0) + n


class DatasetWriter:
    """Writes documents into `<out>/train-NNNNN.{bin,idx}` / `val-NNNNN...` shards and,
    on `close`, `<out>/meta.json`. Counts tokens per modality and documents per split
    and template. Shards roll over after `shard_tokens` tokens.

    Shards are staged in `<out>/.partial/` and moved into place by `close`, which then
    removes shards of an earlier run that were not rewritten; `abort` (or an error)
    leaves `<out>` as it was.
    """

    def __init__(self, out_dir: str | Path, vocab: Vocab, shard_tokens: int = 1 << 28):
        self.out = Path(out_dir)
        self.stage = self.out / ".partial"
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir(parents=True)
        self.vocab = vocab
        self.shard_tokens = int(shard_tokens)
        self._writers: dict[str, ShardWriter] = {}
        self._shard_no = {"train": 0, "val": 0}
        self._shard_fill = {"train": 0, "val": 0}
        self.counts = DocumentCounts(vocab)
        self.written: list[Path] = []

    def add(self, split: str, ids: list[int], template: str | None = None) -> None:
        if split not in self._shard_no:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        arr = np.asarray(ids, dtype=np.int64)
        if split not in self._writers or self._shard_fill[split] >= self.shard_tokens:
            self._roll(split)
        self._writers[split].add_document(arr)
        self._shard_fill[split] += arr.size
        self.counts.add(split, arr, template)

    def _roll(self, split: str) -> None:
        if split in self._writers:
            self._writers[split].close()
            self._shard_no[split] += 1
        prefix = self.stage / f"{split}-{self._shard_no[split]:05d}"
        self._writers[split] = ShardWriter(prefix, self.vocab.size)
        self._shard_fill[split] = 0
        self.written += [prefix.with_suffix(".bin"), prefix.with_suffix(".idx")]

    def close(self, tokenizers_dir: str | Path, extra: dict | None = None) -> dict:
        """Finish the shards, remove shards of an earlier run that this one did not
        rewrite, and write meta.json (returned as a dict). `tokenizers_dir` is stored
        relative to the output directory when it can be."""
        for split in ("train", "val"):
            if split not in self._writers:
                self._roll(split)  # an empty split still gets a (valid, empty) shard
            self._writers[split].close()
        keep = {p.name for p in self.written}
        for old in list(self.out.glob("train-*")) + list(self.out.glob("val-*")):
            if old.suffix in (".bin", ".idx") and old.name not in keep:
                old.unlink()
        for path in self.written:
            os.replace(path, self.out / path.name)
        self.stage.rmdir()
        return write_meta(self.out, self.vocab, tokenizers_dir, self.counts.to_dict(), extra)


    def abort(self) -> None:
        """Drop everything written so far; `<out>` keeps what it had before."""
        for w in self._writers.values():
            w.__exit__(RuntimeError, None, None)
        shutil.rmtree(self.stage, ignore_errors=True)


def write_meta(out: Path, vocab: Vocab, tokenizers_dir: str | Path, counts: dict, extra: dict | None = None) -> dict:
    """Write `<out>/meta.json` atomically and return it: the vocabulary, the tokenizer
    folder (relative to `out` when it can be), `counts` (tokens_per_modality, documents,
    tokens, templates) and `extra`."""
    out, tok = Path(out), Path(tokenizers_dir)
    try:
        tok_ref = os.path.relpath(tok.resolve(), out.resolve())
    except ValueError:  # another drive
        tok_ref = str(tok.resolve())
    meta = {
        "vocab": _vocab_dict(vocab),
        "tokenizers": tok_ref,
        "tokens_per_modality": dict(counts["tokens_per_modality"]),
        "documents": dict(counts["documents"]),
        "tokens": dict(counts["tokens"]),
        "templates": dict(sorted(counts["templates"].items())),
        **(extra or {}),
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def _vocab_dict(vocab: Vocab) -> dict:
    return asdict(vocab.cfg)
