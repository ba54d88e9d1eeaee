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
    python tools/prepare_data.py --verify DIR

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

from megamm.data.documents import (DatasetWriter, DocumentMix, Example, build_document, encode_examples, example_rng,
                                   split_of)
from megamm.data.shards import verify_directory
from megamm.data import sources
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
    """A JSONL manifest, one record per non-empty line (see the module doc)."""

    unit = "line"

    def __init__(self, manifest: Path):
        if not manifest.is_file():
            raise PrepareError(f"manifest not found: {manifest}")
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise PrepareError(f"{manifest}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        self.lines = [(line_no, text) for line_no, text in enumerate(lines, start=1) if text.strip()]
        if not self.lines:
            raise PrepareError(f"{manifest}: no examples (the manifest is empty)")
        self.name, self.base, self.total = str(manifest), manifest.resolve().parent, len(self.lines)

    def records(self):
        for line_no, text in self.lines:
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
            progress: bool = True, pretrained: dict | None = None, seq_len: int = DEFAULT_SEQ_LEN) -> Report:
    """An input -> shards + meta.json in `out`. `manifest`: a manifest's path, or a source
    from open_source (tar shards, a dataset). `pretrained`: keyword arguments of
    megamm.tokenizers.compose (text, image, audio and their settings) that build
    `out/tokenizers/` from `tokenizers_dir` (or the default) first. `seq_len`: the row
    length interleaved documents are cut to fit. Raises PrepareError on fatal problems."""
    start = time.perf_counter()
    mix = mix or DocumentMix()
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if seq_len < 3:
        raise PrepareError(f"--seq-len must be >= 3, got {seq_len}")
    source = manifest if hasattr(manifest, "records") else ManifestSource(Path(manifest))
    name = source.name
    report = Report(unit=source.unit, seq_len=seq_len)

    if tokenizers_dir is None:
        tokenizers_dir = ensure_default_tokenizers(progress=progress)
    elif not Path(tokenizers_dir).is_dir():
        raise PrepareError(f"tokenizer directory not found: {tokenizers_dir}")
    pretrained = {k: v for k, v in (pretrained or {}).items() if v is not None}
    composed = out / ".tokenizers.next"  # becomes out/tokenizers only once the shards are written
    if pretrained:
        try:
            tokenizers_dir = compose(composed, tokenizers_dir, **pretrained)
        except (FileNotFoundError, ValueError, ConfigError) as e:
            raise PrepareError(str(e)) from None
    try:
        toks = Tokenizers.load(tokenizers_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise PrepareError(f"cannot load tokenizers from {tokenizers_dir}: {e}") from None
    vocab = Vocab(toks.vocab_config())

    tasks = _chunks(source, report)
    first = list(islice(tasks, 2))  # a pool only pays off for two tasks or more
    tasks = chain(first, tasks)
    writer = DatasetWriter(out, vocab)
    pool = None
    try:
        if workers > 1 and len(first) > 1:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizers_dir),))
            results = _in_order(pool, tasks, ahead=2 * workers)
        else:
            results = _inline(tasks, toks)
        bar = tqdm(total=source.total, desc="prepare", unit="ex", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        for chunk in results:
            for res in chunk:
                for issue in res.issues:
                    _add_issue(report, issue, strict, name)
                if res.encoded is None:
                    continue
                split = res.split or split_of(seed, res.key, val_fraction)
                if isinstance(res.encoded, list):
                    _add_interleaved(report, writer, res, split, vocab, strict, name)
                    continue
                doc = build_document(res.encoded, vocab, mix, example_rng(seed, res.key))
                if doc is None:
                    _add_issue(report, Issue(res.key, f"no template with a positive weight fits its "
                                                      f"modalities {sorted(res.encoded.modalities)}",
                                             where=res.where), strict, name)
                    continue
                writer.add(split, doc[0], doc[1])
                report.examples += 1
            bar.update(len(chunk))
        bar.close()
        if report.lines == 0:
            raise PrepareError(f"{name}: no examples (it holds no {report.unit}s)")
        if report.examples == 0:
            first_bad = report.skipped[0] if report.skipped else None
            raise PrepareError(f"{name}: no usable examples ({len(report.skipped)} bad {report.unit}(s); "
                               f"first: {_where(first_bad)}: {first_bad.message})"
                               if first_bad else f"{name}: no usable examples")
        if pretrained:
            shutil.rmtree(out / "tokenizers", ignore_errors=True)
            composed.rename(out / "tokenizers")
            tokenizers_dir = out / "tokenizers"
        extra = {"source": name, "seed": seed, "val_fraction": val_fraction, "mix": mix.to_dict()}
        if report.unit == "line":
            extra["skipped_lines"] = sorted(i.line for i in report.skipped)
        else:
            extra["skipped"] = [i.where for i in sorted(report.skipped, key=lambda i: i.line)]
        if report.interleaved:
            extra["interleaved"] = {"documents": report.interleaved, "cut": len(report.cut), "seq_len": seq_len}
        report.meta = writer.close(tokenizers_dir, extra=extra)
    except BaseException:
        writer.abort()
        shutil.rmtree(composed, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    report.seconds = time.perf_counter() - start
    return report


def _chunks(source, report: Report):
    """The source's records in tasks of CHUNK, read as they are asked for (streamed)."""
    records = source.records()
    base = str(source.base)
    while True:
        try:
            items = list(islice(records, CHUNK))
        except (OSError, ValueError, tarfile.TarError) as e:  # a damaged tar or dataset file: fatal, in one line
            raise PrepareError(f"{source.name}: cannot read ({type(e).__name__}: {_first_line(e)})") from None
        if not items:
            return
        report.lines += len(items)
        yield base, items


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _in_order(pool, tasks, ahead: int):
    """encode_chunk over `tasks` in the pool, results in task order, at most `ahead`
    tasks in flight (Pool.imap would read the whole input ahead)."""
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(encode_chunk, (task,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _add_interleaved(report: Report, writer: DatasetWriter, res: Result, split: str, vocab: Vocab,
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
    """encode_chunk over `tasks` in this process, single-threaded like the workers."""
    for task in tasks:
        with torch_threads(1):
            result = encode_chunk(task, toks)
        yield result


def _where(issue: Issue) -> str:
    return issue.where or f"line {issue.line}"


def _add_issue(report: Report, issue: Issue, strict: bool, source: str) -> None:
    if strict:
        where = f"{source}:{issue.line}" if report.unit == "line" else _where(issue)
        raise PrepareError(f"{where}: {issue.message} (--strict)")
    (report.repaired if issue.fatal_only_in_strict else report.skipped).append(issue)


def summarise(report: Report) -> str:
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
    if args.out is None:
        ap.error("--out is required (or --verify DIR)")

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
                         seq_len=args.seq_len)
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
