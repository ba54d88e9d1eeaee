"""Images, sounds and figures as files, with numpy and the standard library alone.

Images are uint8 `[H, W, 3]` RGB arrays everywhere.

    read_image(path)               PNG (own decoder) or .npy; other formats via Pillow
                                   when it is installed
    write_png(path, image)         8-bit RGB or grayscale PNG, written atomically
    read_wav(path, sample_rate)    PCM .wav -> float32 mono [T] at sample_rate (+ a note
                                   when it had to be resampled)
    write_wav(path, audio, rate)   float [T] in [-1, 1] -> 16-bit mono PCM .wav, atomically
    render_text, image_grid,       figures drawn with a built-in 5x7 bitmap font:
    line_plot                      captioned sample grids and training curves

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
import math
import os
import struct
import wave
import zlib
from pathlib import Path

import numpy as np


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
        return _as_rgb(arr, name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MediaError(f"unreadable image {name!r} ({e.strerror or type(e).__name__})") from None
    if data.startswith(PNG_SIGNATURE):
        return _decode_png(data, name)
    try:
        from PIL import Image
    except ImportError:
        if path.suffix.lower() == ".png":
            raise MediaError(f"unreadable image {name!r} (not a PNG file)") from None
        raise MediaError(f"cannot read {path.suffix or 'extension-less'} image {name!r} without Pillow "
                         "(pip install pillow), or save it as .png or .npy") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _as_rgb(np.asarray(im.convert("RGB")), name)
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"unreadable image {name!r} ({type(e).__name__})") from None


def _as_rgb(arr: np.ndarray, name: str) -> np.ndarray:
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
    from megamm.tokenizers.dsp import resample

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


# ---- bitmap font -----------------------------------------------------------------------------
GLYPH_W, GLYPH_H = 5, 9
"""A glyph is 5 x 9 pixels: rows 0-6 hold capitals, digits and ascenders, x-height letters
span rows 2-6, descenders (g j p q y ,) reach rows 7-8."""
ADVANCE, LINE_HEIGHT = GLYPH_W + 1, GLYPH_H + 1
"""One character occupies an ADVANCE x LINE_HEIGHT cell at scale 1 (glyph + 1 pixel gap)."""
_FONT_ROWS = {
    "a": ". . .###. ....# .#### #...# .####",
    "b": "#.... #.... ####. #...# #...# #...# ####.",
    "c": ". . .###. #.... #.... #.... .###.",
    "d": "....# ....# .#### #...# #...# #...# .####",
    "e": ". . .###. #...# ##### #.... .###.",
    "f": "..##. .#... ####. .#... .#... .#... .#...",
    "g": ". . .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... ####. #...# #...# #...# #...#",
    "i": "..#.. . .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. . ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": ". . ##.#. #.#.# #.#.# #.#.# #.#.#",
    "n": ". . ####. #...# #...# #...# #...#",
    "o": ". . .###. #...# #...# #...# .###.",
    "p": ". . ####. #...# #...# #...# ####. #.... #....",
    "q": ". . .#### #...# #...# #...# .#### ....# ....#",
    "r": ". . #.##. ##..# #.... #.... #....",
    "s": ". . .#### #.... .###. ....# ####.",
    "t": ".#... .#... ####. .#... .#... .#..# ..##.",
    "u": ". . #...# #...# #...# #..## .##.#",
    "v": ". . #...# #...# #...# .#.#. ..#..",
    "w": ". . #...# #...# #.#.# #.#.# .#.#.",
    "x": ". . #...# .#.#. ..#.. .#.#. #...#",
    "y": ". . #...# #...# #...# #...# .#### ....# .###.",
    "z": ". . ##### ...#. ..#.. .#... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": ".",
    ".": ". . . . . .##.. .##..",
    ",": ". . . . . .##.. .##.. ..#.. .#...",
    ":": ". .##.. .##.. . .##.. .##..",
    ";": ". .##.. .##.. . .##.. .##.. ..#.. .#...",
    "-": ". . . ##### ",
    "=": ". . ##### . #####",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    "/": ". ....# ...#. ..#.. .#... #....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "+": ". ..#.. ..#.. ##### ..#.. ..#..",
    "_": ". . . . . . #####",
    "'": "..#.. ..#.. .#...",
    '"': ".#.#. .#.#. #.#..",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. . ..#..",
    "?": ".###. #...# ....# ...#. ..#.. . ..#..",
    "*": ". ..#.. #.#.# .###. #.#.# ..#..",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "~": ". . .#... #.#.# ...#.",
}
_MISSING_ROWS = "##### #...# #...# #...# #...# #...# #####"
"""Drawn for characters the font lacks (an empty box), so they show instead of vanishing."""


def _glyph(rows: str) -> np.ndarray:
    grid = np.zeros((GLYPH_H, GLYPH_W), bool)
    for r, row in enumerate(rows.split()):
        grid[r, : len(row)] = [ch == "#" for ch in row]
    return grid


_FONT = {ch: _glyph(rows) for ch, rows in _FONT_ROWS.items()}
_MISSING = _glyph(_MISSING_ROWS)


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of render_text(text, scale)."""
    lines = text.split("\n")
    return LINE_HEIGHT * len(lines) * scale, ADVANCE * max(len(line) for line in lines) * scale


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """bool `[h, w]`: True on the pixels of the glyphs of `text` ("\\n" starts a new line;
    upper case is drawn with the lower-case glyphs)."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    lines = text.split("\n")
    h, w = text_size(text)
    mask = np.zeros((h, w), bool)
    for r, line in enumerate(lines):
        for c, ch in enumerate(line):
            glyph = _FONT.get(ch.lower(), _MISSING)
            mask[r * LINE_HEIGHT: r * LINE_HEIGHT + GLYPH_H, c * ADVANCE: c * ADVANCE + GLYPH_W] = glyph
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def render_text(text: str, scale: int = 1, color=(0, 0, 0), bg=(255, 255, 255)) -> np.ndarray:
    """`text` in the built-in font -> uint8 `[h, w, 3]` of size text_size(text, scale):
    `color` on `bg`, each character a 6 x 10 cell (times `scale`) with its gap included."""
    mask = text_mask(text, scale)
    return np.where(mask[:, :, None], np.asarray(color, np.uint8), np.asarray(bg, np.uint8))


def wrap_text(text: str, max_chars: int, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap to lines of at most `max_chars` characters (longer words are cut);
    past `max_lines` lines the last kept line ends with "..".
    """
    max_chars = max(1, max_chars)
    lines, current = [], ""
    for word in text.split():
        while len(word) > max_chars:
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:max_chars])
            word = word[max_chars:]
        if not word:
            continue
        if current and len(current) + 1 + len(word) <= max_chars:
            current += " " + word
        else:
            if current:
                lines.append(current)
            current = word
    if current:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        last = lines[max_lines - 1]
        lines = lines[: max_lines - 1] + [(last[: max(0, max_chars - 2)] + "..")[:max_chars]]
    return lines


# ---- figures ---------------------------------------------------------------------------------
def _clipped(canvas_shape, patch_shape, y: int, x: int):
    """Slices of canvas and patch where a patch placed with its top-left corner at (y, x)
    overlaps the canvas, or None when it lies outside."""
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + patch_shape[0], canvas_shape[0]), min(x + patch_shape[1], canvas_shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


def _paste(canvas: np.ndarray, patch: np.ndarray, y: int, x: int) -> None:
    """Copy `patch` onto `canvas` with its top-left corner at (y, x), clipped to the canvas."""
    where = _clipped(canvas.shape, patch.shape, y, x)
    if where:
        canvas[where[0]] = patch[where[1]]


def _draw_text(canvas: np.ndarray, text: str, y: int, x: int, color=(0, 0, 0), anchor: str = "left") -> None:
    """Draw `text` (transparent background) with its top edge at y; `anchor` says whether x
    is its left edge, centre or right edge."""
    mask = text_mask(text)
    x -= {"left": 0, "center": mask.shape[1] // 2, "right": mask.shape[1]}[anchor]
    where = _clipped(canvas.shape, mask.shape, y, x)
    if where:
        canvas[where[0]][mask[where[1]]] = color


def image_grid(images, captions: list[str] | None = None, columns: int = 8, scale: int = 2,
               pad: int = 4, max_lines: int = 3) -> np.ndarray:
    """Images (uint8 `[h, w, 3]` or `[h, w]`, all the same size) in a grid on white, each
    scaled up `scale` times (nearest neighbour) with its caption under it, wrapped to the
    image width and cut at `max_lines` lines. Returns uint8 `[H, W, 3]` with

        C = min(columns, N), R = ceil(N / C)
        W = C * w * scale + (C + 1) * pad
        H = R * (h * scale + caption_h) + (R + 1) * pad
        caption_h = 0 without captions, else 2 + LINE_HEIGHT * (most lines any caption needs)
    """
    images = [_as_rgb(np.asarray(im), f"#{i}") for i, im in enumerate(images)]
    if not images:
        raise ValueError("image_grid needs at least one image")
    h, w = images[0].shape[:2]
    odd = [i for i, im in enumerate(images) if im.shape[:2] != (h, w)]
    if odd:
        raise ValueError(f"image_grid: image {odd[0]} is {list(images[odd[0]].shape)}, image 0 is [{h}, {w}, 3]")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"image_grid: {len(captions)} captions for {len(images)} images")
    if columns < 1 or scale < 1 or pad < 0:
        raise ValueError(f"image_grid: columns and scale must be >= 1, pad >= 0 "
                         f"(got {columns}, {scale}, {pad})")
    cw, ch = w * scale, h * scale
    wrapped = [wrap_text(c, cw // ADVANCE, max_lines) for c in captions] if captions else None
    caption_h = 2 + LINE_HEIGHT * max(1, max(len(lines) for lines in wrapped)) if wrapped else 0
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = np.full((rows * (ch + caption_h) + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        y = pad + (i // cols) * (ch + caption_h + pad)
        x = pad + (i % cols) * (cw + pad)
        grid[y: y + ch, x: x + cw] = im.repeat(scale, axis=0).repeat(scale, axis=1)
        for n, line in enumerate(wrapped[i] if wrapped else []):
            _draw_text(grid, line, y + ch + 2 + n * LINE_HEIGHT, x + cw // 2 + 1, anchor="center")
    return grid


PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
"""Series colours of line_plot, in order (repeating after the tenth)."""
_GRID_GRAY = (225, 225, 225)


def _nice_ticks(lo: float, hi: float, target: int) -> list[float]:
    """Round values (1, 2 or 5 x 10^k apart) inside [lo, hi], about `target` of them."""
    raw = (hi - lo) / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _tick_labels(ticks: list[float]) -> list[str]:
    """Short labels for tick values, with as many decimals as the gaps between them need."""
    labels = []
    for i, v in enumerate(ticks):
        gaps = [abs(ticks[j] - v) for j in (i - 1, i + 1) if 0 <= j < len(ticks)]
        spacing = min(gaps) if gaps else (abs(v) or 1.0)
        if abs(v) < spacing * 1e-6:
            labels.append("0")
        elif abs(v) >= 1e6 or abs(v) < 1e-4:
            mantissa, exp = f"{v:.2e}".split("e")
            labels.append(f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}")
        else:
            decimals = max(0, -math.floor(math.log10(spacing) + 1e-9))
            text = f"{v:.{decimals}f}"
            labels.append(text.rstrip("0").rstrip(".") if "." in text else text)
    return labels


def _log_ticks(lo: float, hi: float, target: int) -> list[float]:
    """Tick values for a log10 axis spanning [10^lo, 10^hi]."""
    decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    if len(decades) >= 2:
        every = -(-len(decades) // max(target, 2))
        return [10.0 ** k for k in decades[::every]]
    ticks = [m * 10.0 ** k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 3, 5)
             if lo - 1e-9 <= math.log10(m) + k <= hi + 1e-9]
    return ticks if len(ticks) >= 2 else _nice_ticks(10.0 ** lo, 10.0 ** hi, target)


def _polyline(canvas: np.ndarray, px: np.ndarray, py: np.ndarray, color, box, width: int = 2) -> None:
    """Join the points (px, py) (pixel coordinates) with straight segments `width` pixels
    thick, drawn only inside box = (top, bottom, left, right)."""
    if len(px) == 1:
        px, py = np.repeat(px, 2), np.repeat(py, 2)
    steps = np.maximum(np.abs(np.diff(px)), np.abs(np.diff(py))).astype(np.int64) + 1  # samples per segment
    seg = np.repeat(np.arange(len(steps)), steps)  # segment of each sample
    k = np.arange(len(seg)) - np.repeat(np.cumsum(steps) - steps, steps)  # its index within the segment
    t = k / np.repeat(np.maximum(steps - 1, 1), steps)  # 0 at the segment's start, 1 at its end
    xs = np.rint(px[seg] + t * (px[seg + 1] - px[seg])).astype(np.int64)
    ys = np.rint(py[seg] + t * (py[seg + 1] - py[seg])).astype(np.int64)
    top, bottom, left, right = box
    for dy in range(width):
        for dx in range(width):
            y, x = ys + dy - width // 2, xs + dx - width // 2
            keep = (y >= top) & (y <= bottom) & (x >= left) & (x <= right)
            canvas[y[keep], x[keep]] = color


def line_plot(series: dict[str, list[tuple[float, float]]], title: str = "", xlabel: str = "step",
              ylabel: str = "loss", size: tuple[int, int] = (640, 400), logy: bool = False) -> np.ndarray:
    """A line chart -> uint8 `[height, width, 3]` for size = (width, height).

    One polyline per series in PALETTE order, through its (x, y) points sorted by x;
    points with a non-finite value (or y <= 0 when `logy`) are left out. Axes carry
    round-numbered ticks and labels, light grid lines and a legend in the top right.
    """
    width, height = size
    if width < 160 or height < 120:
        raise ValueError(f"line_plot size must be at least (160, 120), got {size}")
    clean = {}
    for name, points in series.items():
        pts = np.asarray(list(points), np.float64).reshape(-1, 2)
        keep = np.isfinite(pts).all(axis=1) & ((pts[:, 1] > 0) if logy else True)
        pts = pts[keep]
        clean[name] = pts[np.argsort(pts[:, 0], kind="stable")]
    allpts = np.concatenate([p for p in clean.values()] + [np.zeros((0, 2))])
    ys = np.log10(allpts[:, 1]) if logy else allpts[:, 1]
    xlo, xhi = (allpts[:, 0].min(), allpts[:, 0].max()) if len(allpts) else (0.0, 1.0)
    ylo, yhi = (ys.min(), ys.max()) if len(ys) else (0.0, 1.0)
    if xhi - xlo <= 0:
        xlo, xhi = xlo - 1, xhi + 1
    margin = (yhi - ylo) * 0.05 if yhi > ylo else max(abs(yhi) * 0.1, 0.5 if logy else 1.0)
    ylo, yhi = ylo - margin, yhi + margin

    # layout: left = ylabel + y tick labels + tick marks; bottom = ticks + tick labels + xlabel
    yticks = _log_ticks(ylo, yhi, (height - 80) // 50) if logy else _nice_ticks(ylo, yhi, (height - 80) // 50)
    ylabels = _tick_labels(yticks)
    top = 8 + (LINE_HEIGHT + 6 if title else 0)
    left = 4 + (LINE_HEIGHT + 4 if ylabel else 0) + max(text_size(s)[1] for s in ylabels) + 6
    bottom = height - 1 - (6 + LINE_HEIGHT + (LINE_HEIGHT + 4 if xlabel else 0) + 4)
    right = width - 1 - 16
    xticks = _nice_ticks(xlo, xhi, max(2, (right - left) // 90))
    xlabels = _tick_labels(xticks)

    def to_px(x):
        return left + (np.asarray(x, np.float64) - xlo) / (xhi - xlo) * (right - left)

    def to_py(y):
        y = np.log10(np.asarray(y, np.float64)) if logy else np.asarray(y, np.float64)
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    img = np.full((height, width, 3), 255, np.uint8)
    for v, label in zip(yticks, ylabels):
        y = int(round(float(to_py(v))))
        img[y, left: right + 1] = _GRID_GRAY
        img[y, left - 4: left] = 0
        _draw_text(img, label, y - GLYPH_H // 2 + 1, left - 6, anchor="right")
    for v, label in zip(xticks, xlabels):
        x = int(round(float(to_px(v))))
        img[top: bottom + 1, x] = _GRID_GRAY
        img[bottom + 1: bottom + 5, x] = 0
        _draw_text(img, label, bottom + 6, x, anchor="center")
    img[top: bottom + 1, [left, right]] = 0
    img[[top, bottom], left: right + 1] = 0
    if title:
        _draw_text(img, title, 6, (left + right) // 2, anchor="center")
    if xlabel:
        _draw_text(img, xlabel, bottom + 6 + LINE_HEIGHT + 4, (left + right) // 2, anchor="center")
    if ylabel:
        vertical = np.rot90(render_text(ylabel))  # reads bottom to top
        _paste(img, vertical, (top + bottom) // 2 - vertical.shape[0] // 2, 4)

    box = (top + 1, bottom - 1, left + 1, right - 1)
    for i, (name, pts) in enumerate(clean.items()):
        if len(pts):
            _polyline(img, to_px(pts[:, 0]), to_py(pts[:, 1]), PALETTE[i % len(PALETTE)], box)

    if clean:  # legend: a white box in the top-right corner, one swatch + name per series
        names = list(clean)
        lw = 4 + 16 + 4 + max(text_size(n)[1] for n in names) + 2
        lh = 4 + LINE_HEIGHT * len(names) + 2
        ly, lx = top + 6, max(left + 2, right - 6 - lw)
        lw, lh = min(lw, width - lx), min(lh, height - ly)  # a legend too big for the chart is cut
        img[ly: ly + lh, lx: lx + lw] = 255
        img[[ly, ly + lh - 1], lx: lx + lw] = 0
        img[ly: ly + lh, [lx, lx + lw - 1]] = 0
        for i, name in enumerate(names):
            y = ly + 4 + i * LINE_HEIGHT
            img[y + 3: y + 5, lx + 4: lx + 20] = PALETTE[i % len(PALETTE)]
            _draw_text(img, name, y, lx + 24)
    return img
