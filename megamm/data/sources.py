"""Where examples come from besides a JSONL manifest: WebDataset tar shards and Hugging
Face datasets, plus the interleaved documents any source may hold. Each becomes the
records tools/prepare_data.py encodes (the same as a manifest line's).

A source yields `Record`s in input order:

    key      int >= 1, unique: seeds the example's document RNG and its train/val draw
             (megamm.data.documents.example_rng / split_of), so the documents depend on
             neither the worker count nor the batching
    where    how reports name it: "line N" (a manifest), "SHARD.tar:KEY" (a tar
             sample), "PATH[row N]" (a dataset row, N counted from 0 as in ds[N])
    fields   one example, {"text": str, "image": MEDIA, "audio": MEDIA} (any subset, plus
             an optional "split": "train" | "val"), or one interleaved document,
             {"segments": [{"text": str} | {"image": MEDIA} | {"audio": MEDIA}, ...]}
    problem  instead of fields: why the input cannot become an example (one line)

MEDIA is a path (str, relative to the source's folder, or absolute), a `Blob` (the
bytes of a file, e.g. a tar member, with the name reports give it) or `Samples` (decoded
audio and its rate). Records travel to worker processes, so they hold only such data.

Decoding follows megamm.media's policies for files (EXIF orientation, transparency on
white, the centred square resized with its Lanczos filter, upsampling and resampling
reported, soxr at its quality) through its byte entry points (decode_image, fit_square,
decode_audio, fit_rate).

Interleaved documents (OBELICS / MMC4 style) keep their segments in order; one longer
than a row (`seq_len` tokens) is cut between segments into several documents
(`interleaved_documents`).
"""
from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamm import media
from megamm.media import MediaError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Tar members read as the sample's image, in this order of preference."""
AUDIO_EXTS = ("flac", "wav")
"""Tar members read as the sample's audio."""
CAPTION_FIELDS = ("text", "caption")
"""Fields of a `KEY.json` member that hold the caption, in this order of preference."""


class SourceError(ValueError):
    """A source that cannot be read at all (missing shards, a missing column); one line."""


@dataclass(frozen=True)
class Blob:
    """The bytes of one media file and the name reports give it."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Samples:
    """Decoded audio: float samples `[T]` (or `[C, T]`, as datasets stores channels) at `rate` Hz."""

    name: str
    array: np.ndarray
    rate: int


@dataclass(frozen=True)
class Record:
    key: int
    where: str
    fields: dict | None = None
    problem: str | None = None


# ---- decoding media that are not files ---------------------------------------------------
def read_image_sized(ref, base: Path, size: int, min_side: int = 1) -> tuple[np.ndarray, str | None]:
    """A MEDIA image -> (uint8 `[size, size, 3]`, note if upsampled), as
    megamm.media.read_image_sized does for files; raises MediaError."""
    if isinstance(ref, str):
        return media.read_image_sized(base / ref, size, min_side)
    image = media.decode_image(ref.data, ref.name, draft=size)
    return media.fit_square(image, ref.name, size, min_side)


def read_audio(ref, base: Path, sample_rate: int) -> tuple[np.ndarray, str | None]:
    """A MEDIA clip -> (float32 mono `[T]` at `sample_rate`, note if resampled), as
    megamm.media.read_audio does for files; raises MediaError."""
    if isinstance(ref, str):
        return media.read_audio(base / ref, sample_rate)
    if not isinstance(ref, Samples):
        return media.decode_audio(ref.data, ref.name, sample_rate)
    pcm = np.asarray(ref.array, np.float32)
    if pcm.ndim not in (1, 2) or not np.isfinite(pcm).all():
        raise MediaError(f"audio {ref.name!r} has shape {list(pcm.shape)} or non-finite samples; "
                         f"expected finite [T] or [channels, T]")
    mono = pcm if pcm.ndim == 1 else pcm.mean(axis=0, dtype=np.float32)
    return media.fit_rate(mono, int(ref.rate), sample_rate, ref.name)


# ---- interleaved documents ---------------------------------------------------------------
def interleaved_documents(segments: list[list[int]], vocab, seq_len: int) -> list[list[int]]:
    """Unified-id segments (vocab.text_segment / image_segment / audio_segment), in order
    -> documents of at most `seq_len` tokens each, cut only between segments. A segment
    that alone does not fit (with <bos> and <eos>) becomes a document of its own, longer
    than `seq_len`."""
    docs, current, length = [], [], 2
    for seg in segments:
        if current and length + len(seg) > seq_len:
            docs.append(vocab.document(current))
            current, length = [], 2
        current.append(seg)
        length += len(seg)
    docs.append(vocab.document(current))
    return docs


# ---- WebDataset tar shards ---------------------------------------------------------------
class WebDatasetSource:
    """Tar shards in WebDataset layout, `KEY.EXT` members grouped by KEY: `KEY.jpg|jpeg|
    png|webp` the image, `KEY.txt` the caption (or `KEY.json` with a "text" or "caption"
    field), `KEY.flac|wav` the audio. Other members are ignored; a sample without a
    caption is a problem record. `pattern` brace-expands as webdataset does
    ("DIR/{00000..00099}.tar"); read with webdataset, one member at a time."""

    unit = "sample"

    def __init__(self, pattern: str):
        from webdataset.shardlists import expand_urls  # deferred: only --webdataset runs import it

        self.name = pattern
        self.base = Path(".")
        self.total = None
        self.urls = list(expand_urls(pattern))
        if not self.urls:
            raise SourceError(f"--webdataset {pattern!r} names no shards")
        missing = [u for u in self.urls if not Path(u).is_file()]
        if missing:
            raise SourceError(f"webdataset shard not found: {missing[0]}"
                              + (f" (and {len(missing) - 1} more of {len(self.urls)})" if len(missing) > 1 else ""))
        self.input_files = [Path(u) for u in self.urls]
        """The files read: a resumed preparation refuses them changed (megamm.data.slices)."""

    def records(self) -> Iterator[Record]:
        import webdataset  # deferred, as in __init__

        samples = webdataset.WebDataset(self.urls, shardshuffle=False, empty_check=False)
        for key, sample in enumerate(samples, start=1):
            where = f"{sample['__url__']}:{sample['__key__']}"
            try:
                yield Record(key, where, self._fields(sample, where))
            except ValueError as e:
                yield Record(key, where, problem=str(e))

    @staticmethod
    def _fields(sample: dict, where: str) -> dict:
        members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
        listed = ", ".join(f"{sample['__key__']}.{k}" for k in sorted(members)) or "none"
        fields = {}
        if "txt" in members:
            try:
                fields["text"] = members["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"caption {where}.txt is not UTF-8 text ({e.reason} at byte {e.start})") from None
        elif "json" in members:
            try:
                meta = json.loads(members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}.json is not JSON ({type(e).__name__})") from None
            text = next((meta[f] for f in CAPTION_FIELDS if isinstance(meta, dict) and f in meta), None)
            if text is None:
                raise ValueError(f"{where}.json has no 'text' or 'caption' field")
            fields["text"] = text
        for kind, exts in (("image", IMAGE_EXTS), ("audio", AUDIO_EXTS)):
            ext = next((e for e in exts if e in members), None)
            if ext is not None:
                fields[kind] = Blob(f"{where}.{ext}", bytes(members[ext]))
        if "text" not in fields:
            raise ValueError(f"no caption: {where}.txt or {where}.json is missing (members: {listed})")
        return fields


# ---- Hugging Face datasets ---------------------------------------------------------------
class HFDatasetSource:
    """A `datasets` dataset: a folder written by `save_to_disk` (a DatasetDict gives its
    "train" split, or its only one), or parquet / arrow files (a file, a folder of them,
    or a glob), streamed. `columns`: modality -> column name; None for all three means
    the columns "text", "image" and "audio" that exist. Image columns: datasets.Image
    (read undecoded: bytes or a path), bytes, or a path string. Audio columns:
    datasets.Audio (undecoded), {"array", "sampling_rate"} structs, bytes or a path."""

    unit = "row"

    def __init__(self, path: str | Path, columns: dict[str, str | None] | None = None):
        import datasets  # deferred: a 1-2 s import only --hf-dataset runs pay

        self.name = str(path)
        path = Path(path)
        self.base = path if path.is_dir() else path.parent
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                splits = list(ds)
                if "train" not in ds and len(splits) != 1:
                    raise SourceError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(splits)})")
                ds = ds["train" if "train" in ds else splits[0]]
            self.total = len(ds)
            self.input_files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            files = _data_files(path)
            kind = "parquet" if files[0].suffix == ".parquet" else "arrow"
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True)
            self.total = None
            self.input_files = files
        names = list(ds.column_names or [])
        if columns is None or not any(columns.values()):
            columns = {m: m for m in ("text", "image", "audio") if m in names}
            if not columns:
                raise SourceError(f"{path}: no 'text', 'image' or 'audio' column (columns: {', '.join(names)}); "
                                  f"name them with --text-column / --image-column / --audio-column")
        self.columns = {m: c for m, c in columns.items() if c}
        for modality, column in self.columns.items():
            if column not in names:
                raise SourceError(f"{path}: no column {column!r} (--{modality}-column); "
                                  f"its columns: {', '.join(names) or 'none'}")
        features = ds.features or {}
        for column in self.columns.values():  # raw bytes / paths, decoded here by megamm's policies
            feature = features.get(column)
            if isinstance(feature, (datasets.Image, datasets.Audio)) and feature.decode:
                ds = ds.cast_column(column, type(feature)(decode=False))
        self.dataset = ds.select_columns(list(dict.fromkeys(self.columns.values())))

    def records(self) -> Iterator[Record]:
        for row_no, row in enumerate(self.dataset):
            where = f"{self.name}[row {row_no}]"
            try:
                yield Record(row_no + 1, where, self._fields(row, where))
            except ValueError as e:
                yield Record(row_no + 1, where, problem=str(e))

    def _fields(self, row: dict, where: str) -> dict:
        fields = {}
        for modality, column in self.columns.items():
            value = row[column]
            if value is None:
                continue
            if modality == "text":
                if not isinstance(value, str):
                    raise ValueError(f"column {column!r} holds {type(value).__name__}, not text")
                fields["text"] = value
            else:
                fields[modality] = self._media(value, modality, column, f"{where}.{column}")
        if not fields:
            raise ValueError(f"columns {', '.join(self.columns.values())} are all empty (null)")
        return fields

    def _media(self, value, modality: str, column: str, name: str):
        if isinstance(value, dict):
            if modality == "audio" and value.get("array") is not None:
                if value.get("sampling_rate") is None:
                    raise ValueError(f"column {column!r}: audio array without a 'sampling_rate'")
                return Samples(name, np.asarray(value["array"], np.float32), int(value["sampling_rate"]))
            if value.get("bytes"):
                return Blob(name, bytes(value["bytes"]))
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return Blob(name, bytes(value))
        if isinstance(value, str) and value:
            return str(self.base / value)  # an absolute path stays itself
        raise ValueError(f"column {column!r} holds {type(value).__name__}, not an {modality} "
                         f"(bytes, a path, or a datasets.{modality.capitalize()} value)")


def _data_files(path: Path) -> list[Path]:
    """--hf-dataset PATH that is not a saved dataset -> its parquet or arrow files."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.arrow"))
    else:
        files = sorted(Path(f) for f in glob.glob(str(path)))
    files = [f for f in files if f.suffix in (".parquet", ".arrow")]
    if not files:
        raise SourceError(f"--hf-dataset {str(path)!r}: not a dataset saved with save_to_disk, nor parquet or "
                          f"arrow files")
    if len({f.suffix for f in files}) > 1:
        raise SourceError(f"--hf-dataset {str(path)!r}: mixes parquet and arrow files")
    return files
