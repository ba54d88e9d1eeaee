#!/usr/bin/env python
"""Turn examples (a JSONL manifest, WebDataset tar shards or a Hugging Face dataset) of
text / image / audio, or interleaved documents, into train/val token shards and a
meta.json that launch/train.py reads with --data OUT.

    python tools/prepare_data.py (MANIFEST.jsonl | --webdataset PATTERN | --hf-dataset PATH
                                  [--text-column C] [--image-column C] [--audio-column C])
        --out DIR [--tokenizers DIR] [--strict] [--seq-len N]
        [--workers N] [--val-fraction F] [--seed S] [--mix text_image=1,image_text=1,...]
        [--caption-dropout P]
        [--text-tokenizer FILE_OR_DIR] [--image-tokenizer HF_DIR [--image-size S]]
        [--audio-tokenizer HF_DIR [--audio-bandwidth KBPS | --audio-codebooks N]]
        [--shard-size RECORDS] [--num-shards N --shard-index I]
    python tools/prepare_data.py --merge DIR
    python tools/prepare_data.py --verify DIR

Shards, slices, resuming (megamm/data/slices.py): every --shard-size records of the
input (default 50000) become one shard pair, train-KKKKK and val-KKKKK, the K-th. A run
writes the shards k with k % --num-shards == --shard-index (in a SLURM array job: the
task's index and the array's size), so an array job prepares disjoint slices on many
nodes (launch/slurm/prepare_data.sbatch); each works in DIR/.prep/ and leaves a
done-marker per shard and per slice. The slice that finishes last merges: it moves the
shards into DIR and writes meta.json; `--merge DIR` does it by hand, or names the
slices still missing. A killed run, started again with the same arguments, keeps its
finished shards and redoes the one it was writing; other options or a changed input
are refused until DIR/.prep is removed. The input is streamed (memory does not grow
with it), and the shards' bytes do not depend on slices, workers or restarts.

--verify checks every shard of DIR against the checksums its .idx records (see
megamm/data/shards.py): one line per damaged shard, exit status 2 if any is damaged.

Exactly one input. A manifest holds one JSON object per line, paths relative to the
manifest's folder:

    {"text": "a red two", "image": "img/0001.png", "audio": "wav/0001.wav"}
    {"text": "...", "image": "img/0002.npy", "split": "val"}
    {"segments": [{"text": "..."}, {"image": "a.jpg"}, {"text": "..."}, {"audio": "b.flac"}]}

Any subset of the keys works (documents are drawn from the templates the example can
fill, see megamm/data/documents.py); "split" pins an example to train or val,
otherwise --val-fraction decides by a fixed draw per line. A "segments" line is one
interleaved document (OBELICS / MMC4 style): its segments in that order, no template,
no caption dropout; one longer than --seq-len tokens (default: the tiny preset's
max_seq_len, 512) is cut between segments into several documents of at most that
length, which the summary reports (a single segment longer than that stays whole, and
is reported as repaired).

--webdataset 'DIR/{00000..00099}.tar': tar shards in WebDataset layout (brace-expanded
as webdataset does; read one sample at a time): per KEY, `KEY.jpg|jpeg|png|webp` the
image, `KEY.txt` the caption (or `KEY.json` with a "text" or "caption" field),
`KEY.flac|wav` the audio; other members are ignored, a sample without a caption is
skipped. --hf-dataset PATH: a folder written by datasets' save_to_disk (a DatasetDict
gives its "train" split), or parquet / arrow files (a file, a folder of them or a glob),
streamed; the columns --text-column, --image-column, --audio-column (default: those
of "text", "image" and "audio" that exist). Image columns hold datasets.Image values,
bytes or paths; audio columns datasets.Audio values, {"array", "sampling_rate"} or
bytes. See megamm/data/sources.py. Reports name a tar sample "SHARD.tar:KEY" and a row
"PATH[row N]" (N from 0), as they name a manifest line "line N".

Images: any format Pillow reads (JPEG, PNG, WebP, GIF, TIFF, BMP, ...) or .npy (uint8
[H, W, 3], [H, W] or [H, W, 4], or float in [0, 1]); upright as their EXIF orientation
says, transparency on white, then the centred square resized to the image tokenizer's
size with a Lanczos filter (upsampling a smaller image is reported). Audio: WAV (PCM,
float, extensible), FLAC, OGG, MP3 where libsndfile reads it; mixed to mono, resampled
to the tokenizer's rate when it differs (reported). See megamm/media.py.

Bad lines, samples or rows (bad JSON, missing or unreadable file, empty or missing
caption, ...) are skipped and reported with their positions; --strict turns the first
one into an error (one line, exit status 2). An input that cannot be read at all (a
missing shard, a missing column, a damaged tar) is an error in one line. Without
--tokenizers the default tokenizers are used (trained and cached on first use). Same
inputs and options give byte-identical shards.

Pretrained tokenizers: --text-tokenizer takes any HF `tokenizers` tokenizer.json (or a
folder with one: a Llama or Qwen tokenizer folder); --image-tokenizer an HF folder of
Emu3VQVAE, JanusVQVAE or ChameleonVQVAE (encode only: such data trains, but the model
cannot draw images); --audio-tokenizer one of EncodecModel, DacModel, MimiModel,
XcodecModel or WavTokenizerModel (a hub id works where the machine has network). The
parts given replace those of --tokenizers (or the default) in a new tokenizer folder,
OUT/tokenizers/, which meta.json names: training takes the model's vocabulary from it,
and every checkpoint carries it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megamm.data.documents import (DocumentMix, Example, build_document, encode_examples, example_rng,
                                   split_of)
from megamm.data.shards import verify_directory
from megamm.data import slices, sources
from megamm.data.sources import HFDatasetSource, Record, SourceError, WebDatasetSource, interleaved_documents
from megamm.demo.recipe import ensure_default_tokenizers
from megamm.media import MediaError, read_audio, read_image_sized
from megamm.runtime import torch_threads
from megamm.config import ConfigError, get_preset
from megamm.tokenizers import Tokenizers, compose
from megamm.vocab import Vocab

CHUNK = 32
"""Records (manifest lines, tar samples, dataset rows) per worker task; fixed, so output
does not depend on --workers."""
MAX_LISTED = 20
DEFAULT_SEQ_LEN = get_preset("tiny").max_seq_len
"""--seq-len: the row length interleaved documents are cut to fit (the tiny preset's)."""
DEFAULT_SHARD_SIZE = 50_000
"""--shard-size: input records per unit, i.e. per train-KKKKK / val-KKKKK shard pair."""
INTERLEAVED = "interleaved"
"""The template name meta.json counts interleaved documents under."""


class PrepareError(Exception):
    """Fatal problem with the inputs; main() prints it as one line."""


class BadLine(Exception):
    """A manifest line that cannot become an example."""


@dataclass
class Issue:
    line: int
    """The record's key: the manifest line, or the sample's / row's number from 1."""
    message: str
    fatal_only_in_strict: bool = False
    """True for problems that were repaired (resampled audio, an upsampled image): the line is kept."""
    where: str = ""
    """How the summary names the record ("line N", "SHARD.tar:KEY", "PATH[row N]")."""


@dataclass
class Report:
    lines: int = 0
    """Records read (manifest lines, tar samples or dataset rows)."""
    examples: int = 0
    skipped: list[Issue] = field(default_factory=list)
    repaired: list[Issue] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    seconds: float = 0.0
    unit: str = "line"
    """What a record is called in the summary: line, sample or row."""
    interleaved: int = 0
    """Interleaved documents read."""
    cut: list[tuple[str, int]] = field(default_factory=list)
    """(where, parts) of each interleaved document cut to fit --seq-len."""
    seq_len: int = DEFAULT_SEQ_LEN
    slice: tuple[int, int] = (0, 1)
    """(shard index, number of shards) of the run that made this report."""
    written: list[int] = field(default_factory=list)
    """Units this run encoded and wrote."""
    kept: list[int] = field(default_factory=list)
    """This slice's units that an earlier, killed attempt had finished."""
    merged: bool = False
    """Whether this run merged the units into the output (meta is then set)."""
    waiting: str = ""
    """When not merged: which slices the merge waits for."""

    def to_json(self) -> dict:
        """A unit's part of a report, as its done-marker keeps it (megamm.data.slices)."""
        return {"records": self.lines, "examples": self.examples, "interleaved": self.interleaved,
                "skipped": [[i.line, i.where, i.message] for i in self.skipped],
                "repaired": [[i.line, i.where, i.message] for i in self.repaired],
                "cut": [list(c) for c in self.cut]}

    def add_json(self, unit: dict) -> None:
        """Add a unit's part (to_json) to this report."""
        self.examples += unit["examples"]
        self.interleaved += unit["interleaved"]
        self.skipped += [Issue(line, msg, where=where) for line, where, msg in unit["skipped"]]
        self.repaired += [Issue(line, msg, True, where) for line, where, msg in unit["repaired"]]
        self.cut += [tuple(c) for c in unit["cut"]]


@dataclass
class Result:
    """One record after encode_chunk: an EncodedExample, a list of them (one per segment
    of an interleaved document), or None when it was skipped."""

    key: int
    where: str
    split: str | None
    encoded: object
    issues: list[Issue]


class ManifestSource:
    """A JSONL manifest, one record per non-empty line (see the module doc), streamed: it
    is read one line at a time, so memory does not grow with its length."""

    unit = "line"

    def __init__(self, manifest: Path):
        if not manifest.is_file():
            raise PrepareError(f"manifest not found: {manifest}")
        self.name, self.base, self.input_files = str(manifest), manifest.resolve().parent, [manifest]
        self.path = manifest
        self.total = sum(1 for _ in self._lines())
        if not self.total:
            raise PrepareError(f"{manifest}: no examples (the manifest is empty)")

    def _lines(self):
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PrepareError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start} "
                                       f"of line {line_no})") from None
                if text.strip():
                    yield line_no, text

    def records(self):
        for line_no, text in self._lines():
            try:
                yield Record(line_no, f"line {line_no}", parse_line(text, line_no))
            except BadLine as e:
                yield Record(line_no, f"line {line_no}", problem=str(e))


def open_source(manifest: Path | None = None, webdataset: str | None = None, hf_dataset: str | None = None,
                columns: dict[str, str | None] | None = None):
    """Exactly one input -> its source (ManifestSource, sources.WebDatasetSource or
    sources.HFDatasetSource); raises PrepareError."""
    given = [name for name, value in (("MANIFEST", manifest), ("--webdataset", webdataset),
                                      ("--hf-dataset", hf_dataset)) if value is not None]
    if len(given) != 1:
        raise PrepareError("give exactly one input: MANIFEST, --webdataset PATTERN or --hf-dataset PATH "
                           f"(got {' and '.join(given) if given else 'none'})")
    named = [f"--{m}-column" for m, c in (columns or {}).items() if c]
    if named and hf_dataset is None:
        raise PrepareError(f"{', '.join(named)} only go with --hf-dataset")
    try:
        if webdataset is not None:
            return WebDatasetSource(webdataset)
        if hf_dataset is not None:
            if not Path(hf_dataset).exists() and not any(ch in str(hf_dataset) for ch in "*?["):
                raise PrepareError(f"--hf-dataset not found: {hf_dataset}")
            return HFDatasetSource(hf_dataset, columns)
    except SourceError as e:
        raise PrepareError(str(e)) from None
    return ManifestSource(Path(manifest))


# ---- reading one line -------------------------------------------------------------------
def parse_line(text: str, line_no: int) -> dict:
    """One manifest line -> its record; raises BadLine."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise BadLine(f"expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - {"text", "image", "audio", "split", "id", "segments"})
    if unknown:
        raise BadLine(f"unknown key(s) {unknown}")
    if "segments" in rec:
        _check_segments(rec)
    elif not any(k in rec for k in ("text", "image", "audio")):
        raise BadLine("no 'text', 'image' or 'audio' key")
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise BadLine("'text' must be a string")
        if not rec["text"].strip():
            raise BadLine("empty caption")
    for key in ("image", "audio"):
        if key in rec and (not isinstance(rec[key], str) or not rec[key]):
            raise BadLine(f"'{key}' must be a non-empty path string")
    if rec.get("split", "train") not in ("train", "val"):
        raise BadLine(f"'split' must be 'train' or 'val', got {rec['split']!r}")
    return rec


def _check_segments(rec: dict) -> None:
    """An interleaved line: "segments" is a non-empty list of {"text"|"image"|"audio": str}."""
    beside = sorted(set(rec) & {"text", "image", "audio"})
    if beside:
        raise BadLine(f"'segments' and {beside} on one line: give an interleaved document as segments only")
    segments = rec["segments"]
    if not isinstance(segments, list) or not segments:
        raise BadLine("'segments' must be a non-empty list")
    for n, seg in enumerate(segments, start=1):
        if not isinstance(seg, dict) or len(seg) != 1 or next(iter(seg)) not in ("text", "image", "audio"):
            raise BadLine(f"segment {n}: expected {{\"text\": ...}}, {{\"image\": PATH}} or {{\"audio\": PATH}}, "
                          f"got {json.dumps(seg)[:60]}")
        (kind, value), = seg.items()
        if not isinstance(value, str) or not value.strip():
            raise BadLine(f"segment {n}: '{kind}' must be a non-empty string")


def load_image(path: Path, size: int, min_side: int = 1) -> tuple[np.ndarray, str | None]:
    """An image file -> (uint8 [size, size, 3], note if it was upsampled)
    (megamm.media.read_image_sized); raises BadLine, also for an image whose short side
    is below `min_side` (the tokenizer's code grid: not one pixel per code)."""
    try:
        return read_image_sized(path, size, min_side)
    except MediaError as e:
        raise BadLine(str(e)) from None


def load_audio(path: Path, sample_rate: int) -> tuple[np.ndarray, str | None]:
    """An audio file -> (float32 mono [T] at `sample_rate`, note if it was resampled)
    (megamm.media.read_audio); raises BadLine."""
    try:
        return read_audio(path, sample_rate)
    except MediaError as e:
        raise BadLine(str(e)) from None


# ---- workers ----------------------------------------------------------------------------
_worker_tokenizers = None  # set once per worker process by _init_worker


def _init_worker(tokenizers_dir: str) -> None:
    global _worker_tokenizers
    torch.set_num_threads(1)  # parallelism comes from processes; 1 thread = the same codes everywhere
    _worker_tokenizers = Tokenizers.load(tokenizers_dir)


def _load_example(rec: dict, base: Path, toks) -> tuple[Example, list[str]]:
    """{"text", "image", "audio"} (any subset, media as sources.py's MEDIA) -> (Example,
    notes of repairs); raises BadLine."""
    text = rec.get("text")
    if text is not None and not (isinstance(text, str) and text.strip()):
        raise BadLine("empty caption" if isinstance(text, str) else f"caption is {type(text).__name__}, not text")
    ex, notes = Example(text=text), []
    try:
        if "image" in rec:
            ex.image, note = sources.read_image_sized(rec["image"], base, toks.image.image_size, toks.image.grid)
            notes.append(note)
        if "audio" in rec:
            ex.audio, note = sources.read_audio(rec["audio"], base, toks.audio.sample_rate)
            notes.append(note)
    except MediaError as e:
        raise BadLine(str(e)) from None
    return ex, [note for note in notes if note]


def encode_chunk(task: tuple[str, list[Record]], toks=None) -> list[Result]:
    """Load and encode one chunk of records (a base folder, megamm.data.sources.Record's)
    -> a Result each, in key order. `toks`: the tokenizers (default: those _init_worker
    loaded in this worker)."""
    base, items = task
    base = Path(base)
    toks = toks or _worker_tokenizers
    loaded, out = [], []
    for r in items:
        if r.problem is not None:
            out.append(Result(r.key, r.where, None, None, [Issue(r.key, r.problem, where=r.where)]))
            continue
        try:
            if "segments" in r.fields:  # one Example per segment
                examples, notes = [], []
                for n, seg in enumerate(r.fields["segments"], start=1):
                    try:
                        ex, seg_notes = _load_example(seg, base, toks)
                    except BadLine as e:
                        raise BadLine(f"segment {n}: {e}") from None
                    examples.append(ex)
                    notes += [f"segment {n}: {note}" for note in seg_notes]
            else:
                ex, notes = _load_example(r.fields, base, toks)
                examples = [ex]
        except BadLine as e:
            out.append(Result(r.key, r.where, None, None, [Issue(r.key, str(e), where=r.where)]))
            continue
        issues = [Issue(r.key, note, fatal_only_in_strict=True, where=r.where) for note in notes]
        loaded.append((r, examples, issues))
    encoded = iter(encode_examples([ex for _, examples, _ in loaded for ex in examples], toks))
    for r, examples, issues in loaded:
        encs = [next(encoded) for _ in examples]
        out.append(Result(r.key, r.where, r.fields.get("split"),
                          encs if "segments" in r.fields else encs[0], issues))
    return sorted(out, key=lambda res: res.key)


# ---- the whole run ----------------------------------------------------------------------
def prepare(manifest, out: Path, tokenizers_dir: Path | None = None, strict: bool = False,
            workers: int = 1, val_fraction: float = 0.05, seed: int = 0, mix=None,
            progress: bool = True, pretrained: dict | None = None, seq_len: int = DEFAULT_SEQ_LEN,
            shard_size: int = DEFAULT_SHARD_SIZE, num_shards: int | None = None,
            shard_index: int | None = None) -> Report:
    """An input -> shards + meta.json in `out`. `manifest`: a manifest's path, or a source
    from open_source (tar shards, a dataset). `pretrained`: keyword arguments of
    megamm.tokenizers.compose (text, image, audio and their settings) that build
    `out/tokenizers/` from `tokenizers_dir` (or the default) first. `seq_len`: the row
    length interleaved documents are cut to fit.

    Slices (megamm/data/slices.py): every `shard_size` records of the input are one unit,
    written as train-KKKKK / val-KKKKK; this call writes the units k with
    k % num_shards == shard_index (default: the SLURM array task's, else 1 and 0) that are
    not done yet in `out/.prep/`, and merges them into `out` when it finds every unit
    done (`report.merged`). Raises PrepareError on fatal problems."""
    start = time.perf_counter()
    mix = mix or DocumentMix()
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if seq_len < 3:
        raise PrepareError(f"--seq-len must be >= 3, got {seq_len}")
    if shard_size < 1:
        raise PrepareError(f"--shard-size must be >= 1 record, got {shard_size}")
    try:
        num, index = slices.slice_of(num_shards, shard_index)
    except slices.SliceError as e:
        raise PrepareError(str(e)) from None
    source = manifest if hasattr(manifest, "records") else ManifestSource(Path(manifest))
    name = source.name
    report = Report(unit=source.unit, seq_len=seq_len)

    if tokenizers_dir is None:
        tokenizers_dir = ensure_default_tokenizers(progress=progress)
    elif not Path(tokenizers_dir).is_dir():
        raise PrepareError(f"tokenizer directory not found: {tokenizers_dir}")
    pretrained = {k: v for k, v in (pretrained or {}).items() if v is not None}
    area = slices.WorkArea(out)
    options = {"source": name, "input": slices.input_stamp(getattr(source, "input_files", [])),
               "tokenizers": str(Path(tokenizers_dir).resolve()),
               "pretrained": {k: str(v) for k, v in sorted(pretrained.items())},
               "strict": strict, "val_fraction": val_fraction, "seed": seed, "mix": mix.to_dict(),
               "seq_len": seq_len, "shard_size": shard_size, "unit": source.unit}
    fresh = area.options() is None
    try:
        area.claim(options)
    except slices.SliceError as e:
        raise PrepareError(str(e)) from None
    try:
        if pretrained:
            tokenizers_dir = _composed(area, tokenizers_dir, pretrained)
        try:
            toks = Tokenizers.load(tokenizers_dir)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise PrepareError(f"cannot load tokenizers from {tokenizers_dir}: {e}") from None
        vocab = Vocab(toks.vocab_config())
        report.written, kept = _write_units(source, area, report, toks, vocab, str(tokenizers_dir), workers,
                                            num, index, shard_size, strict, seed, val_fraction, mix, name, progress)
        if report.lines == 0:
            raise PrepareError(f"{name}: no examples (it holds no {report.unit}s)")
        area.finish_slice(index, num, report.lines)
        report.slice, report.kept = (index, num), kept
        with area.locked(create=False) as held:
            if held and area.options() is not None:  # else another slice merged already
                records, todo, report.waiting = area.missing(shard_size, num)
                if not todo:
                    report.merged = _merge(area, report, vocab, tokenizers_dir, num)
    except PrepareError:
        if num == 1 and fresh:  # nothing to resume: the input must change first
            shutil.rmtree(area.dir, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    return report


def merge(out: Path) -> Report:
    """--merge OUT: the finished slices' units -> OUT's shards and meta.json (the slice
    that finishes last does this itself). Raises PrepareError naming the missing slices."""
    area = slices.WorkArea(out)
    opts = area.options()
    if opts is None:
        raise PrepareError(f"{out}: nothing to merge (no {slices.WORK}/ work area: every slice merged, "
                           f"or none started)")
    tok = area.dir / "tokenizers" if opts["pretrained"] else Path(opts["tokenizers"])
    try:
        vocab = Vocab(Tokenizers.load(tok).vocab_config())
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise PrepareError(f"cannot load tokenizers from {tok}: {e}") from None
    report = Report(unit=opts["unit"], seq_len=opts["seq_len"])
    with area.locked(create=False) as held:
        if not held or area.options() is None:
            raise PrepareError(f"{out}: nothing to merge (another process merged it meanwhile)")
        report.merged = _merge(area, report, vocab, tok, None)
    return report


def _composed(area, base, pretrained: dict) -> Path:
    """The composed tokenizer folder of this run (made once, by the first slice)."""
    target = area.dir / "tokenizers"
    with area.locked():
        if not target.is_dir():
            try:
                compose(target, base, **pretrained)
            except (FileNotFoundError, ValueError, ConfigError) as e:
                raise PrepareError(str(e)) from None
    return target


def _write_units(source, area, report: Report, toks, vocab: Vocab, tokenizers_dir: str, workers: int,
                 num: int, index: int, shard_size: int, strict: bool, seed: int, val_fraction: float, mix,
                 name: str, progress: bool) -> tuple[list[int], list[int]]:
    """Encode and write this slice's units that are not done: (units written, units kept
    from an earlier attempt), in order."""
    kept: list[int] = []
    written: list[int] = []
    decided = [-1, False]  # (unit, whether to write it): units come in order, each decided once

    def todo(k):
        if decided[0] != k:
            mine = k % num == index
            done = mine and area.done_unit(k) is not None
            if done:
                kept.append(k)
            decided[:] = [k, mine and not done]
        return decided[1]

    tasks = _chunks(source, report, shard_size, todo)
    first = list(islice(tasks, 2))  # a pool only pays off for two tasks or more
    tasks = chain(first, tasks)
    pool, unit, writer = None, None, None
    try:
        if workers > 1 and len(first) > 1:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizers_dir,))
            results = _in_order(pool, tasks, ahead=2 * workers)
        else:
            results = _inline(tasks, toks)
        bar = tqdm(total=source.total, desc="prepare", unit="ex", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        for k, chunk in results:
            if k != unit:
                if writer is not None:
                    writer.close(unit_report.to_json())
                written.append(k)
                unit, writer, unit_report = k, area.unit_writer(k, vocab), Report(unit=report.unit,
                                                                                  seq_len=report.seq_len)
            for res in chunk:
                unit_report.lines += 1
                for issue in res.issues:
                    _add_issue(unit_report, issue, strict, name)
                if res.encoded is None:
                    continue
                split = res.split or split_of(seed, res.key, val_fraction)
                if isinstance(res.encoded, list):
                    _add_interleaved(unit_report, writer, res, split, vocab, strict, name)
                    continue
                doc = build_document(res.encoded, vocab, mix, example_rng(seed, res.key))
                if doc is None:
                    _add_issue(unit_report, Issue(res.key, f"no template with a positive weight fits its "
                                                           f"modalities {sorted(res.encoded.modalities)}",
                                                  where=res.where), strict, name)
                    continue
                writer.add(split, doc[0], doc[1])
                unit_report.examples += 1
            bar.n = report.lines
            bar.refresh()
        if writer is not None:
            writer.close(unit_report.to_json())
            writer = None
        bar.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return written, kept


def _merge(area, report: Report, vocab: Vocab, tokenizers_dir, num: int | None) -> bool:
    """Every unit done -> `report` holds the whole input's counts and issues, OUT its
    shards and meta.json. Raises PrepareError (also for an input without a usable example)."""
    opts = area.options()
    try:
        units = area.units(num)
    except slices.SliceError as e:
        raise PrepareError(str(e)) from None
    report.lines = sum(u["records"] for u in units)
    for u in units:
        report.add_json(u)
    if report.examples == 0:
        first_bad = min(report.skipped, key=lambda i: i.line) if report.skipped else None
        raise PrepareError(f"{opts['source']}: no usable examples ({len(report.skipped)} bad {report.unit}(s); "
                           f"first: {_where(first_bad)}: {first_bad.message})"
                           if first_bad else f"{opts['source']}: no usable examples")
    extra = {"source": opts["source"], "seed": opts["seed"], "val_fraction": opts["val_fraction"],
             "mix": opts["mix"]}
    skipped = sorted(report.skipped, key=lambda i: i.line)
    if report.unit == "line":
        extra["skipped_lines"] = [i.line for i in skipped]
    else:
        extra["skipped"] = [i.where for i in skipped]
    if report.interleaved:
        extra["interleaved"] = {"documents": report.interleaved, "cut": len(report.cut), "seq_len": report.seq_len}
    try:
        report.meta = area.merge(vocab, tokenizers_dir, extra, units)
    except slices.SliceError as e:
        raise PrepareError(str(e)) from None
    return True


def _chunks(source, report: Report, shard_size: int, todo):
    """(unit, task) for the source's records in tasks of at most CHUNK, never across a
    unit's end, read as they are asked for (streamed); records of units `todo(k)` refuses
    are read and counted but not handed out."""
    records = source.records()
    base = str(source.base)
    while True:
        unit, offset = divmod(report.lines, shard_size)
        try:
            items = list(islice(records, min(CHUNK, shard_size - offset)))
        except (OSError, ValueError, tarfile.TarError) as e:  # a damaged tar or dataset file: fatal, in one line
            raise PrepareError(f"{source.name}: cannot read ({type(e).__name__}: {_first_line(e)})") from None
        if not items:
            return
        report.lines += len(items)
        if todo(unit):
            yield unit, (base, items)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _in_order(pool, tasks, ahead: int):
    """(unit, encode_chunk(task)) over `tasks` ((unit, task) pairs) in the pool, in task
    order, at most `ahead` tasks in flight (Pool.imap would read the whole input ahead)."""
    pending = deque()
    for unit, task in tasks:
        pending.append((unit, pool.apply_async(encode_chunk, (task,))))
        if len(pending) >= ahead:
            unit_done, result = pending.popleft()
            yield unit_done, result.get()
    while pending:
        unit_done, result = pending.popleft()
        yield unit_done, result.get()


def _add_interleaved(report: Report, writer, res: Result, split: str, vocab: Vocab,
                     strict: bool, name: str) -> None:
    """One interleaved document's segments -> documents of at most --seq-len tokens."""
    segments = []
    for enc in res.encoded:
        if enc.text is not None:
            segments.append(vocab.text_segment(enc.text))
        elif enc.image is not None:
            segments.append(vocab.image_segment(enc.image))
        else:
            segments.append(vocab.audio_segment(enc.audio))
    for n, seg in enumerate(segments, start=1):
        if len(seg) + 2 > report.seq_len:
            _add_issue(report, Issue(res.key, f"segment {n} alone is {len(seg) + 2} tokens, longer than "
                                              f"--seq-len {report.seq_len}: kept whole in a document of its own",
                                     fatal_only_in_strict=True, where=res.where), strict, name)
    docs = interleaved_documents(segments, vocab, report.seq_len)
    for ids in docs:
        writer.add(split, ids, INTERLEAVED)
    report.interleaved += 1
    report.examples += 1
    if len(docs) > 1:
        report.cut.append((res.where, len(docs)))


def _inline(tasks, toks):
    """(unit, encode_chunk(task)) over `tasks` in this process, single-threaded like the workers."""
    for unit, task in tasks:
        with torch_threads(1):
            result = encode_chunk(task, toks)
        yield unit, result


def _where(issue: Issue) -> str:
    return issue.where or f"line {issue.line}"


def _add_issue(report: Report, issue: Issue, strict: bool, source: str) -> None:
    if strict:
        where = f"{source}:{issue.line}" if report.unit == "line" else _where(issue)
        raise PrepareError(f"{where}: {issue.message} (--strict)")
    (report.repaired if issue.fatal_only_in_strict else report.skipped).append(issue)


def summarise(report: Report) -> str:
    if not report.merged:
        index, num = report.slice
        return (f"slice {index} of {num}: wrote {len(report.written)} shard(s)"
                + (f", kept {len(report.kept)} from an earlier attempt" if report.kept else "")
                + (f"; {report.waiting}: the last one to finish merges (or: prepare_data.py --merge OUT)"
                   if report.waiting else "; another slice merged them"))
    m = report.meta
    rate = report.examples / max(report.seconds, 1e-9)
    out = [f"wrote {m['documents']['train']} train + {m['documents']['val']} val documents "
           f"({m['tokens']['train']} + {m['tokens']['val']} tokens) from {report.examples} examples "
           f"in {report.seconds:.1f} s ({rate:.0f} examples/s)",
           "tokens per modality: " + ", ".join(f"{k} {v}" for k, v in m["tokens_per_modality"].items()),
           "templates: " + ", ".join(f"{k} {v}" for k, v in m["templates"].items())]
    if m["documents"]["val"] == 0:
        out.append("note: no val documents (raise --val-fraction or pin lines with \"split\": \"val\")")
    if report.cut:
        parts = sum(n for _, n in report.cut)
        out.append(f"cut {len(report.cut)} of {report.interleaved} interleaved document(s) longer than --seq-len "
                   f"{report.seq_len} between segments, into {parts} documents:")
        out += [f"  {where}: {n} documents" for where, n in report.cut[:MAX_LISTED]]
        if len(report.cut) > MAX_LISTED:
            out.append(f"  ... and {len(report.cut) - MAX_LISTED} more")
    for title, issues in (("skipped", report.skipped), ("repaired", report.repaired)):
        issues = sorted(issues, key=lambda i: i.line)
        if issues:
            out.append(f"{title} {len(issues)} {report.unit}(s):")
            out += [f"  {_where(i)}: {i.message}" for i in issues[:MAX_LISTED]]
            if len(issues) > MAX_LISTED:
                out.append(f"  ... and {len(issues) - MAX_LISTED} more")
    return "\n".join(out)


def verify(directory: Path) -> int:
    """--verify DIR: check every shard's checksums; exit status 0 if all are intact."""
    if not directory.is_dir():
        print(f"prepare_data: error: directory not found: {directory}", file=sys.stderr)
        return 2
    results = verify_directory(directory)
    if not results:
        print(f"prepare_data: error: no shards (*.idx) in {directory}", file=sys.stderr)
        return 2
    bad = [problem for _, problem in results if problem]
    for problem in bad:
        print(f"damaged: {problem}", file=sys.stderr)
    print(f"{len(results) - len(bad)} of {len(results)} shard(s) in {directory} intact")
    return 2 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest", type=Path, nargs="?")
    ap.add_argument("--webdataset", default=None, metavar="PATTERN",
                    help="WebDataset tar shards, brace-expanded: 'DIR/{00000..00099}.tar'")
    ap.add_argument("--hf-dataset", default=None, metavar="PATH",
                    help="a Hugging Face dataset: a save_to_disk folder, or parquet / arrow files")
    ap.add_argument("--text-column", default=None, help="--hf-dataset: the caption column (default: 'text')")
    ap.add_argument("--image-column", default=None, help="--hf-dataset: the image column (default: 'image')")
    ap.add_argument("--audio-column", default=None, help="--hf-dataset: the audio column (default: 'audio')")
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                    help=f"interleaved documents longer than this are cut between segments (default: "
                         f"{DEFAULT_SEQ_LEN}, the tiny preset's max_seq_len)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--verify", type=Path, metavar="DIR", help="check the shards of DIR against their checksums")
    ap.add_argument("--num-shards", type=int, default=None, metavar="N",
                    help="split the work into N slices (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    ap.add_argument("--shard-index", type=int, default=None, metavar="I",
                    help="the slice this run writes, 0 <= I < N (default: SLURM_ARRAY_TASK_ID - "
                         "SLURM_ARRAY_TASK_MIN, else 0)")
    ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="RECORDS",
                    help=f"input records per shard (default {DEFAULT_SHARD_SIZE}); fixes the shards' "
                         f"boundaries, so their bytes do not depend on --num-shards or --workers")
    ap.add_argument("--merge", type=Path, metavar="DIR",
                    help="merge the finished slices in DIR into its shards and meta.json (the last slice "
                         "to finish does this itself)")
    ap.add_argument("--tokenizers", type=Path, default=None,
                    help="tokenizer directory (text/, image/, audio/); default: the embedded dataset's")
    ap.add_argument("--text-tokenizer", type=Path, default=None, metavar="FILE_OR_DIR",
                    help="an HF tokenizers tokenizer.json, or a folder with one (e.g. a Llama or Qwen tokenizer)")
    ap.add_argument("--image-tokenizer", default=None, metavar="HF_DIR",
                    help="HF folder (or hub id) of Emu3VQVAE, JanusVQVAE or ChameleonVQVAE")
    ap.add_argument("--image-size", type=int, default=None,
                    help="side of the square images the --image-tokenizer encodes (default: its own)")
    ap.add_argument("--audio-tokenizer", default=None, metavar="HF_DIR",
                    help="HF folder (or hub id) of EncodecModel, DacModel, MimiModel, XcodecModel or WavTokenizerModel")
    ap.add_argument("--audio-bandwidth", type=float, default=None, metavar="KBPS",
                    help="EnCodec / Xcodec: the bandwidth, i.e. how many codebooks (default: the lowest)")
    ap.add_argument("--audio-codebooks", type=int, default=None, metavar="N",
                    help="DAC / Mimi: how many codebooks to keep (default: all)")
    ap.add_argument("--strict", action="store_true", help="any bad line is fatal")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", default=None, help="template weights, e.g. text_image=1,image_text=1,image=0.2")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.verify is not None:
        return verify(args.verify)
    if args.merge is not None:
        try:
            start = time.perf_counter()
            report = merge(args.merge)
            report.seconds = time.perf_counter() - start
        except PrepareError as e:
            print(f"prepare_data: error: {e}", file=sys.stderr)
            return 2
        print(summarise(report))
        return 0
    if args.out is None:
        ap.error("--out is required (or --verify DIR, or --merge DIR)")

    try:
        if args.workers < 1:
            raise PrepareError(f"--workers must be >= 1, got {args.workers}")
        try:
            mix = (DocumentMix.parse(args.mix, args.caption_dropout) if args.mix
                   else DocumentMix(caption_dropout=args.caption_dropout))
        except ValueError as e:
            raise PrepareError(f"--mix/--caption-dropout: {e}") from None
        pretrained = {"text": args.text_tokenizer, "image": args.image_tokenizer, "audio": args.audio_tokenizer,
                      "image_size": args.image_size, "audio_bandwidth": args.audio_bandwidth,
                      "audio_codebooks": args.audio_codebooks}
        columns = {"text": args.text_column, "image": args.image_column, "audio": args.audio_column}
        if args.quiet and args.hf_dataset is not None:
            import datasets

            datasets.disable_progress_bars()  # this process only: the CLI's --quiet
        source = open_source(args.manifest, args.webdataset, args.hf_dataset, columns)
        report = prepare(source, args.out, args.tokenizers, args.strict, args.workers,
                         args.val_fraction, args.seed, mix, progress=not args.quiet, pretrained=pretrained,
                         seq_len=args.seq_len, shard_size=args.shard_size, num_shards=args.num_shards,
                         shard_index=args.shard_index)
    except PrepareError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare_data: interrupted", file=sys.stderr)
        return 130
    print(summarise(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
