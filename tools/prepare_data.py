#!/usr/bin/env python
"""Turn a JSONL manifest of text / image / audio examples into train/val token
shards and a meta.json that launch/train.py reads with --data OUT.

    python tools/prepare_data.py MANIFEST.jsonl --out DIR [--tokenizers DIR] [--strict]
        [--workers N] [--val-fraction F] [--seed S] [--mix text_image=1,image_text=1,...]
        [--caption-dropout P]
        [--text-tokenizer FILE_OR_DIR] [--image-tokenizer HF_DIR [--image-size S]]
        [--audio-tokenizer HF_DIR [--audio-bandwidth KBPS | --audio-codebooks N]]
    python tools/prepare_data.py --verify DIR

--verify checks every shard of DIR against the checksums its .idx records (see
megamm/data/shards.py): one line per damaged shard, exit status 2 if any is damaged.

One JSON object per line, paths relative to the manifest's folder:

    {"text": "a red two", "image": "img/0001.png", "audio": "wav/0001.wav"}
    {"text": "...", "image": "img/0002.npy", "split": "val"}

Any subset of the keys works (documents are drawn from the templates the example can
fill, see megamm/data/documents.py); "split" pins an example to train or val,
otherwise --val-fraction decides by a fixed draw per line. Images: any format Pillow
reads (JPEG, PNG, WebP, GIF, TIFF, BMP, ...) or .npy (uint8 [H, W, 3], [H, W] or
[H, W, 4], or float in [0, 1]); upright as their EXIF orientation says, transparency on
white, then the centred square resized to the image tokenizer's size with a Lanczos
filter (upsampling a smaller image is reported). Audio: WAV (PCM, float, extensible),
FLAC, OGG, MP3 where libsndfile reads it; mixed to mono, resampled to the tokenizer's
rate when it differs (reported). See megamm/media.py.

Bad lines (bad JSON, missing or unreadable file, empty caption, ...) are skipped and
reported with their line numbers; --strict turns the first one into an error (one
line, exit status 2). Without --tokenizers the default tokenizers are used (trained and
cached on first use). Same inputs and options give byte-identical shards.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megamm.data.documents import (DatasetWriter, DocumentMix, Example, build_document, encode_examples, example_rng,
                                   split_of)
from megamm.data.shards import verify_directory
from megamm.demo.recipe import ensure_default_tokenizers
from megamm.media import MediaError, read_audio, read_image_sized
from megamm.runtime import torch_threads
from megamm.config import ConfigError
from megamm.tokenizers import Tokenizers, compose
from megamm.vocab import Vocab

CHUNK = 32
"""Manifest lines per worker task; fixed, so output does not depend on --workers."""
MAX_LISTED = 20


class PrepareError(Exception):
    """Fatal problem with the inputs; main() prints it as one line."""


class BadLine(Exception):
    """A manifest line that cannot become an example."""


@dataclass
class Issue:
    line: int
    message: str
    fatal_only_in_strict: bool = False
    """True for problems that were repaired (resampled audio, an upsampled image): the line is kept."""


@dataclass
class Report:
    lines: int = 0
    examples: int = 0
    skipped: list[Issue] = field(default_factory=list)
    repaired: list[Issue] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    seconds: float = 0.0


# ---- reading one line -------------------------------------------------------------------
def parse_line(text: str, line_no: int) -> dict:
    """One manifest line -> its record; raises BadLine."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise BadLine(f"expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - {"text", "image", "audio", "split", "id"})
    if unknown:
        raise BadLine(f"unknown key(s) {unknown}")
    if not any(k in rec for k in ("text", "image", "audio")):
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


def encode_chunk(task: tuple[str, list[tuple[int, dict]]], toks=None):
    """Load and encode one chunk of records -> [(line, EncodedExample | None, [Issue])].
    `toks`: the tokenizers (default: those _init_worker loaded in this worker)."""
    base, items = task
    toks = toks or _worker_tokenizers
    loaded, out = [], []
    for line_no, rec in items:
        issues: list[Issue] = []
        try:
            ex = Example(text=rec.get("text"))
            notes = []
            if "image" in rec:
                ex.image, note = load_image(Path(base) / rec["image"], toks.image.image_size, toks.image.grid)
                notes.append(note)
            if "audio" in rec:
                ex.audio, note = load_audio(Path(base) / rec["audio"], toks.audio.sample_rate)
                notes.append(note)
            issues += [Issue(line_no, note, fatal_only_in_strict=True) for note in notes if note]
        except BadLine as e:
            out.append((line_no, None, [Issue(line_no, str(e))]))
            continue
        loaded.append((line_no, ex, issues))
    encoded = encode_examples([ex for _, ex, _ in loaded], toks)
    out += [(line_no, enc, issues) for (line_no, _, issues), enc in zip(loaded, encoded)]
    return sorted(out, key=lambda r: r[0])


# ---- the whole run ----------------------------------------------------------------------
def prepare(manifest: Path, out: Path, tokenizers_dir: Path | None = None, strict: bool = False,
            workers: int = 1, val_fraction: float = 0.05, seed: int = 0, mix=None,
            progress: bool = True, pretrained: dict | None = None) -> Report:
    """Manifest -> shards + meta.json in `out`. `pretrained`: keyword arguments of
    megamm.tokenizers.compose (text, image, audio and their settings) that build
    `out/tokenizers/` from `tokenizers_dir` (or the default) first. Raises PrepareError on
    fatal problems."""
    start = time.perf_counter()
    mix = mix or DocumentMix()
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not manifest.is_file():
        raise PrepareError(f"manifest not found: {manifest}")
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{manifest}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    report = Report()
    records: list[tuple[int, dict]] = []
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        report.lines += 1
        try:
            records.append((line_no, parse_line(text, line_no)))
        except BadLine as e:
            _add_issue(report, Issue(line_no, str(e)), strict, manifest)
    if report.lines == 0:
        raise PrepareError(f"{manifest}: no examples (the manifest is empty)")

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

    pinned_split = {line_no: rec.get("split") for line_no, rec in records}
    base = str(manifest.resolve().parent)
    tasks = [(base, records[i:i + CHUNK]) for i in range(0, len(records), CHUNK)]
    writer = DatasetWriter(out, vocab)
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            pool = mp.get_context("spawn").Pool(min(workers, len(tasks)), _init_worker, (str(tokenizers_dir),))
            results = pool.imap(encode_chunk, tasks)
        else:
            results = _inline(tasks, toks)
        bar = tqdm(total=len(records), desc="prepare", unit="ex", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        for chunk in results:
            for line_no, enc, issues in chunk:
                for issue in issues:
                    _add_issue(report, issue, strict, manifest)
                if enc is None:
                    continue
                doc = build_document(enc, vocab, mix, example_rng(seed, line_no))
                if doc is None:
                    _add_issue(report, Issue(line_no, f"no template with a positive weight fits its "
                                                      f"modalities {sorted(enc.modalities)}"), strict, manifest)
                    continue
                split = pinned_split.get(line_no) or split_of(seed, line_no, val_fraction)
                writer.add(split, doc[0], doc[1])
                report.examples += 1
            bar.update(len(chunk))
        bar.close()
        if report.examples == 0:
            raise PrepareError(f"{manifest}: no usable examples ({len(report.skipped)} bad line(s); "
                               f"first: line {report.skipped[0].line}: {report.skipped[0].message})"
                               if report.skipped else f"{manifest}: no usable examples")
        if pretrained:
            shutil.rmtree(out / "tokenizers", ignore_errors=True)
            composed.rename(out / "tokenizers")
            tokenizers_dir = out / "tokenizers"
        report.meta = writer.close(tokenizers_dir, extra={
            "source": str(manifest), "seed": seed, "val_fraction": val_fraction, "mix": mix.to_dict(),
            "skipped_lines": sorted(i.line for i in report.skipped)})
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


def _inline(tasks, toks):
    """encode_chunk over `tasks` in this process, single-threaded like the workers."""
    for task in tasks:
        with torch_threads(1):
            result = encode_chunk(task, toks)
        yield result


def _add_issue(report: Report, issue: Issue, strict: bool, manifest: Path) -> None:
    if strict:
        raise PrepareError(f"{manifest}:{issue.line}: {issue.message} (--strict)")
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
    for title, issues in (("skipped", report.skipped), ("repaired", report.repaired)):
        issues = sorted(issues, key=lambda i: i.line)
        if issues:
            out.append(f"{title} {len(issues)} line(s):")
            out += [f"  line {i.line}: {i.message}" for i in issues[:MAX_LISTED]]
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
    if args.manifest is None or args.out is None:
        ap.error("MANIFEST and --out are required (or --verify DIR)")

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
        report = prepare(args.manifest, args.out, args.tokenizers, args.strict, args.workers,
                         args.val_fraction, args.seed, mix, progress=not args.quiet, pretrained=pretrained)
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
