"""Images and sounds as files, with numpy and the standard library alone.

Images are uint8 `[H, W, 3]` RGB arrays everywhere.

    read_image(path)               PNG (own decoder) or .npy; other formats via Pillow
                                   when it is installed
    write_png(path, image)         8-bit RGB or grayscale PNG, written atomically
    read_wav(path, sample_rate)    PCM .wav -> float32 mono [T] at sample_rate (+ a note
                                   when it had to be resampled)
    write_wav(path, audio, rate)   float [T] in [-1, 1] -> 16-bit mono PCM .wav, atomically
    as_rgb(array, name)            what an image file may hold -> uint8 [H, W, 3]

PNG decoding covers what common encoders write: bit depths 1/2/4/8/16, colour types
gray, gray+alpha, RGB, RGBA and palette, all five row filters, Adam7 interlacing;
every chunk's CRC is checked. Alpha (and tRNS) is dropped, 16-bit samples keep their
high byte, low-depth gray is scaled to 0..255.

Every failure to read or write a file is a MediaError (a ValueError) whose one-line
message names the file: "missing image file '...'", "unreadable image '...' (bad CRC
in the IDAT chunk)", "unsupported image '...' (...)", and the same for audio.
"""
from __future__ import annotations

import io
import os
import struct
import wave
import zlib
from pathlib import Path

import numpy as np

from megamm.tokenizers.dsp import resample


class MediaError(ValueError):
    """A media file that is missing, unreadable, corrupt or in an unsupported format."""


# ---- files -----------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` beside `path` and rename it into place: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"cannot write {str(path)!r} ({e.strerror or type(e).__name__})") from None


# ---- PNG -------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""PNG colour type -> samples per pixel: gray, RGB, palette, gray+alpha, RGBA."""
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""Interlace passes as (x0, y0, dx, dy): pass p holds the pixels image[y0::dy, x0::dx]."""
_MAX_PIXELS = 1 << 28


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """uint8 `[H, W, 3]` (RGB) or `[H, W]` (gray) -> an 8-bit PNG (filter 0, zlib level 6)."""
    path = Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) \
            or min(image.shape[:2]) < 1:
        raise MediaError(f"cannot write {str(path)!r}: expected uint8 [H, W, 3] or [H, W], "
                         f"got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    colour_type = 2 if image.ndim == 3 else 0
    rows = np.ascontiguousarray(image).reshape(h, -1)
    scanlines = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter byte 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    _write_atomic(path, PNG_SIGNATURE + chunk(b"IHDR", ihdr)
                  + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + chunk(b"IEND", b""))


def _decode_png(data: bytes, name: str) -> np.ndarray:
    """The bytes of a PNG file -> uint8 [H, W, 3]; raises MediaError."""
    def bad(detail: str) -> MediaError:
        return MediaError(f"unreadable image {name!r} ({detail})")

    pos, header, palette, idat = len(PNG_SIGNATURE), None, None, []
    while True:
        if pos + 8 > len(data):
            raise bad("truncated PNG: no IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        label = kind.decode("latin-1")
        body, crc = data[pos + 8: pos + 8 + length], data[pos + 8 + length: pos + 12 + length]
        if len(crc) < 4:
            raise bad(f"truncated PNG in the {label} chunk")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise bad(f"bad CRC in the {label} chunk")
        pos += 12 + length
        if header is None and kind != b"IHDR":
            raise bad("PNG does not start with an IHDR chunk")
        if kind == b"IHDR":
            if length != 13:
                raise bad("IHDR chunk of the wrong size")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            if length % 3 or not 0 < length <= 768:
                raise bad(f"PLTE chunk of {length} bytes")
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, compression, filter_method, interlace = header
    if colour_type not in _CHANNELS or depth not in _DEPTHS[colour_type]:
        raise bad(f"invalid PNG colour type {colour_type} with bit depth {depth}")
    if compression or filter_method or interlace > 1:
        raise bad("unknown PNG compression, filter or interlace method")
    if not (width and height):
        raise bad(f"PNG of size {width}x{height}")
    if width * height > _MAX_PIXELS:
        raise MediaError(f"unsupported image {name!r} ({width}x{height} pixels is too large)")
    if colour_type == 3 and palette is None:
        raise bad("palette PNG without a PLTE chunk")
    if not idat:
        raise bad("PNG without an IDAT chunk")

    channels = _CHANNELS[colour_type]
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(-(-(height - y0) // dy), -(-(width - x0) // dx)) for x0, y0, dx, dy in passes]
    strides = [-(-w * channels * depth // 8) for _, w in sizes]
    expected = sum(h * (1 + s) for (h, w), s in zip(sizes, strides) if h and w)
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat), expected)
    except zlib.error as e:
        raise bad(f"corrupt PNG image data: {e}") from None
    if len(raw) < expected:
        raise bad(f"truncated PNG image data ({len(raw)} of {expected} bytes)")

    samples = np.zeros((height, width, channels), np.int32)
    buf, offset = np.frombuffer(raw, np.uint8), 0
    for (x0, y0, dx, dy), (h, w), stride in zip(passes, sizes, strides):
        if not (h and w):  # a pass of a small interlaced image can be empty: it has no bytes
            continue
        lines = buf[offset: offset + h * (1 + stride)].reshape(h, 1 + stride)
        offset += h * (1 + stride)
        if lines[:, 0].max() > 4:
            raise bad(f"PNG row filter type {lines[:, 0].max()} (0..4 exist)")
        rows = _unfilter(lines[:, 1:], lines[:, 0], max(1, channels * depth // 8))
        samples[y0::dy, x0::dx] = _unpack_samples(rows, w, channels, depth)

    if colour_type == 3:
        if samples.max() >= len(palette):
            raise bad(f"palette index {samples.max()} beyond the {len(palette)}-entry palette")
        return palette[samples[:, :, 0]]
    if depth == 16:
        samples >>= 8
    elif depth < 8:
        samples *= 255 // (2 ** depth - 1)
    rgb = samples[:, :, :3] if colour_type in (2, 6) else np.repeat(samples[:, :, :1], 3, axis=2)
    return rgb.astype(np.uint8)


def _unfilter(filtered: np.ndarray, types: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the PNG row filters: uint8 `[H, S]` filtered rows + their filter types -> `[H, S]`.

    A byte is predicted from the decoded bytes left (a, `bpp` bytes back), up (b) and
    up-left (c): filter 0 none, 1 a, 2 b, 3 floor((a + b) / 2), 4 Paeth(a, b, c); the
    stored byte is the difference mod 256. Every pixel of one anti-diagonal x + y = k
    depends only on earlier diagonals, so a diagonal is decoded in one vectorised step:
    H + W - 1 steps rather than a Python loop over every byte.
    """
    h, s = filtered.shape
    if not types.any():
        return filtered
    w = s // bpp
    diff = filtered.reshape(h, w, bpp).astype(np.int32)
    out = np.zeros((h + 1, w + 1, bpp), np.int32)  # row 0 and column 0: the zeros outside the image
    kinds = types.astype(np.int32)
    for k in range(h + w - 1):
        y = np.arange(max(0, k - w + 1), min(h, k + 1))
        x = k - y
        a, b, c = out[y + 1, x], out[y, x + 1], out[y, x]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        t = kinds[y][:, None]
        pred = np.where(t == 1, a, np.where(t == 2, b, np.where(t == 3, (a + b) >> 1,
                                                                np.where(t == 4, paeth, 0))))
        out[y + 1, x + 1] = (diff[y, x] + pred) & 255
    return out[1:, 1:].reshape(h, s).astype(np.uint8)


def _unpack_samples(rows: np.ndarray, w: int, channels: int, depth: int) -> np.ndarray:
    """Decoded rows uint8 `[H, S]` -> int32 samples `[H, w, channels]` of `depth` bits."""
    h = rows.shape[0]
    if depth == 8:
        return rows[:, : w * channels].reshape(h, w, channels)
    if depth == 16:
        pairs = rows[:, : 2 * w * channels].reshape(h, w, channels, 2).astype(np.int32)
        return (pairs[..., 0] << 8) | pairs[..., 1]
    bits = np.unpackbits(rows, axis=1)[:, : w * depth].reshape(h, w, depth).astype(np.int32)
    return (bits @ (1 << np.arange(depth - 1, -1, -1)))[:, :, None]


# ---- any image -------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 `[H, W, 3]`.

    PNG is recognised by its signature and decoded here; `.npy` holds uint8 `[H, W, 3]`,
    `[H, W]`, `[H, W, 1]`, `[H, W, 4]` or floats in [0, 1]; other formats (JPEG, ...)
    are read through Pillow when it is installed.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise MediaError(f"missing image file {name!r}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any decoding failure is an unreadable file
            raise MediaError(f"unreadable image {name!r} ({type(e).__name__})") from None
        return as_rgb(arr, name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MediaError(f"unreadable image {name!r} ({e.strerror or type(e).__name__})") from None
    if data.startswith(PNG_SIGNATURE):
        return _decode_png(data, name)
    try:
        from PIL import Image  # optional dependency: only for formats other than PNG and .npy
    except ImportError:
        if path.suffix.lower() == ".png":
            raise MediaError(f"unreadable image {name!r} (not a PNG file)") from None
        raise MediaError(f"cannot read {path.suffix or 'extension-less'} image {name!r} without Pillow "
                         "(pip install pillow), or save it as .png or .npy") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return as_rgb(np.asarray(im.convert("RGB")), name)
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"unreadable image {name!r} ({type(e).__name__})") from None


def as_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8 `[H, W]`, `[H, W, 1]`, `[H, W, 3]`, `[H, W, 4]` (alpha dropped) or floats in
    [0, 1] -> uint8 `[H, W, 3]`; anything else is a MediaError naming `name`."""
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and 0.0 <= arr.min() and arr.max() <= 1.0:
            arr = np.rint(arr * 255).astype(np.uint8)
        else:
            raise MediaError(f"image {name!r} has dtype {arr.dtype}; expected uint8 (or float in [0, 1])")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise MediaError(f"image {name!r} has shape {list(arr.shape)}; expected [H, W, 3]")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


# ---- WAV -------------------------------------------------------------------------------------
def read_wav(path: str | os.PathLike, sample_rate: int) -> tuple[np.ndarray, str | None]:
    """A PCM .wav (8/16/24/32-bit, any channels) -> (float32 mono `[T]` at `sample_rate`,
    a note when it was resampled from another rate, else None). Channels are averaged."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise MediaError(f"missing audio file {name!r}")
    try:
        with wave.open(name, "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError, struct.error) as e:
        raise MediaError(f"unreadable audio {name!r} ({e or type(e).__name__})") from None
    if width == 1:
        pcm = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        pcm = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8)[: len(raw) // 3 * 3].reshape(-1, 3).astype(np.int32)
        pcm = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608
    elif width == 4:
        pcm = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    else:
        raise MediaError(f"audio {name!r} has {8 * width}-bit samples; expected 8/16/24/32-bit PCM")
    pcm = pcm[: len(pcm) // channels * channels].reshape(-1, channels).mean(axis=1)
    if pcm.size == 0:
        raise MediaError(f"empty audio {name!r}")
    if rate != sample_rate:
        return resample(pcm, rate, sample_rate), f"resampled audio {name!r} from {rate} Hz to {sample_rate} Hz"
    return pcm.astype(np.float32), None


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """float `[T]` in [-1, 1] (clipped) -> 16-bit mono PCM .wav."""
    path = Path(path)
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise MediaError(f"cannot write {str(path)!r}: expected mono audio [T], got shape {list(audio.shape)}")
    pcm = np.clip(np.rint(audio.astype(np.float64) * 32767), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    _write_atomic(path, buf.getvalue())
