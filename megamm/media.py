"""Images and sounds as files, through Pillow (images), soundfile (audio) and soxr
(resampling).

Images are uint8 `[H, W, 3]` RGB arrays everywhere; audio is float32 mono `[T]`.

    read_image(path)                   any image Pillow reads, or .npy -> uint8 [H, W, 3]
    read_image_sized(path, size)       the same, centre-cropped to a square and resized to
                                       size x size (+ a note when it had to be upsampled)
    decode_image(bytes, name)          read_image for the bytes of a file (a tar member, ...)
    fit_square(image, name, size)      read_image_sized's crop and resize of an array
    write_png(path, image)             uint8 RGB or grayscale -> 8-bit PNG, atomically
    read_audio(path, sample_rate)      any audio soundfile reads -> float32 mono [T] at
                                       sample_rate (+ a note when it was resampled);
                                       read_wav is the same function
    decode_audio(bytes, name, rate)    read_audio for the bytes of a file
    fit_rate(mono, rate, to, name)     read_audio's resampling (+ note) of an array
    resample(wave, rate, to)           soxr at RESAMPLE_QUALITY
    write_wav(path, audio, rate)       float [T] in [-1, 1] -> 16-bit mono PCM .wav, atomically
    as_rgb(array, name)                what an image array may hold -> uint8 [H, W, 3]

Images: JPEG, PNG, WebP, GIF (its first frame), TIFF, BMP and the other formats Pillow
opens. The EXIF orientation is applied (a phone photo reads upright); transparency
(RGBA, LA, palette or gray with a tRNS entry) is composited onto white; 16-bit samples
keep their high byte. `.npy` files hold uint8 `[H, W]`, `[H, W, 1]`, `[H, W, 3]`,
`[H, W, 4]` (alpha composited onto white) or floats in [0, 1].

Resizing (read_image_sized): the centred square of the short side is kept (the aspect
ratio is never distorted) and resized with Pillow's Lanczos filter
(`Image.Resampling.LANCZOS`, antialiased); an image that already is size x size is
returned untouched, pixel for pixel. A JPEG much larger than the target is decoded at a
reduced DCT scale first (`Image.draft`, to at least twice the target size), which is
what makes a folder of 12-megapixel photos quick to read.

Audio: WAV (PCM 8/16/24/32-bit, 32/64-bit float, WAVE_FORMAT_EXTENSIBLE), FLAC,
OGG/Vorbis and Opus, AIFF, and MP3 where the installed libsndfile reads it (1.1+).
Channels are averaged to mono; another sample rate is resampled with soxr at its "HQ"
quality (a windowed-sinc polyphase resampler for any pair of rates, 44.1 kHz included).

Every failure to read or write a file is a MediaError (a ValueError) whose one-line
message names the file and says what to do: "missing image file '...'", "unreadable
image '...' (...): re-save it as PNG or JPEG, or leave it out", and the same for audio.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile
import soxr
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_FILTER = Image.Resampling.LANCZOS
"""The filter read_image_sized resizes with."""
RESAMPLE_QUALITY = "HQ"
"""soxr's quality setting for audio at another sample rate."""
_IMAGE_FIX = "re-save it as PNG or JPEG, or leave it out"
_AUDIO_FIX = "convert it to WAV or FLAC (e.g. ffmpeg -i IN OUT.wav), or leave it out"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class MediaError(ValueError):
    """A media file that is missing, unreadable, corrupt or in an unsupported format."""


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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


# ---- images ----------------------------------------------------------------------------------
def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """uint8 `[H, W, 3]` (RGB) or `[H, W]` (gray) -> an 8-bit PNG (Pillow, zlib level 6)."""
    path = Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) \
            or min(image.shape[:2]) < 1:
        raise MediaError(f"cannot write {str(path)!r}: expected uint8 [H, W, 3] or [H, W], "
                         f"got {image.dtype} {list(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=6)
    _write_atomic(path, buf.getvalue())


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file (any format Pillow reads, or .npy) -> uint8 `[H, W, 3]`, upright and
    with transparency composited onto white (see the module doc)."""
    return _decode(Path(path))


def read_image_sized(path: str | os.PathLike, size: int, min_side: int = 1) -> tuple[np.ndarray, str | None]:
    """An image file -> (uint8 `[size, size, 3]`: its centred square resized with
    RESIZE_FILTER, a note when the square was smaller than `size` and had to be
    upsampled, else None). A size x size image comes back untouched. An image whose short
    side is below `min_side` (an image tokenizer's code grid) is a MediaError."""
    path = Path(path)
    return fit_square(_decode(path, draft=size), str(path), size, min_side)


def fit_square(image: np.ndarray, name: str, size: int, min_side: int = 1) -> tuple[np.ndarray, str | None]:
    """uint8 `[H, W, 3]` -> read_image_sized's (image, note) for it; `name` for messages."""
    h, w = image.shape[:2]
    if min(h, w) < min_side:
        raise MediaError(f"image {name!r} is {w}x{h}, smaller than the image tokenizer's {min_side}x{min_side} "
                         f"code grid: give images at least {size} pixels on their short side, or leave it out")
    if (h, w) == (size, size):
        return image, None
    fitted = ImageOps.fit(Image.fromarray(image), (size, size), method=RESIZE_FILTER)
    note = None
    if min(h, w) < size:
        note = (f"upsampled image {name!r} from {w}x{h} to {size}x{size}: smaller than the image "
                f"tokenizer's input; give images at least {size} pixels on their short side")
    return np.asarray(fitted, np.uint8).copy(), note


def decode_image(data: bytes, name: str, draft: int | None = None) -> np.ndarray:
    """The bytes of an image file (a tar member, a dataset cell) -> uint8 `[H, W, 3]`, as
    read_image reads files; `name` for messages. Raises MediaError."""
    return _open(io.BytesIO(data), name, draft)


def _decode(path: Path, draft: int | None = None) -> np.ndarray:
    """read_image; `draft`: let a large JPEG decode at a reduced scale, to >= 2 * draft."""
    name = str(path)
    if not path.is_file():
        raise MediaError(f"missing image file {name!r}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any decoding failure is an unreadable file
            raise MediaError(f"unreadable image {name!r} ({type(e).__name__}): {_IMAGE_FIX}") from None
        return as_rgb(arr, name)
    return _open(path, name, draft)


def _open(fp, name: str, draft: int | None) -> np.ndarray:
    """A path or file object Pillow opens -> uint8 `[H, W, 3]`, upright, alpha on white."""
    try:
        with Image.open(fp) as im:
            im.seek(0)  # an animation's first frame
            if draft and im.format == "JPEG":
                im.draft("RGB", (2 * draft, 2 * draft))
            upright = ImageOps.exif_transpose(im)  # a loaded copy, rotated as its EXIF says
        return as_rgb(_pixels(upright), name)
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"unreadable image {name!r} (not an image format Pillow knows): {_IMAGE_FIX}") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"unsupported image {name!r} ({_one_line(e)}): shrink it first") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data, bad EXIF, odd modes
        raise MediaError(f"unreadable image {name!r} ({_one_line(e)}): {_IMAGE_FIX}") from None


def _pixels(im: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` (with alpha)."""
    if im.mode in _WIDE_MODES:  # 16-bit (or 32-bit integer) gray: keep the high byte
        return (np.clip(np.asarray(im, np.int64), 0, 65535) >> 8).astype(np.uint8)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return np.asarray(im.convert("RGBA"))
    return np.asarray(im.convert("RGB"))


def as_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8 `[H, W]`, `[H, W, 1]`, `[H, W, 3]`, `[H, W, 4]` (composited onto white) or
    floats in [0, 1] -> uint8 `[H, W, 3]`; anything else is a MediaError naming `name`."""
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
    if arr.shape[2] == 4:  # over white: rgb * a + 255 * (1 - a), rounded to nearest
        rgb, alpha = arr[:, :, :3].astype(np.int32), arr[:, :, 3:].astype(np.int32)
        arr = ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


# ---- audio -----------------------------------------------------------------------------------
def read_audio(path: str | os.PathLike, sample_rate: int) -> tuple[np.ndarray, str | None]:
    """An audio file soundfile reads (see the module doc) -> (float32 mono `[T]` at
    `sample_rate`, a note when it was resampled from another rate, else None).
    Channels are averaged; PCM samples are scaled to [-1, 1) (int16 / 32768, ...)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"missing audio file {str(path)!r}")
    return _read_audio(str(path), str(path), sample_rate)


def decode_audio(data: bytes, name: str, sample_rate: int) -> tuple[np.ndarray, str | None]:
    """The bytes of an audio file (a tar member, a dataset cell) -> read_audio's
    (clip, note); `name` for messages. Raises MediaError."""
    return _read_audio(io.BytesIO(data), name, sample_rate)


def _read_audio(fp, name: str, sample_rate: int) -> tuple[np.ndarray, str | None]:
    try:
        pcm, rate = soundfile.read(fp, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:
        raise MediaError(f"unreadable audio {name!r} ({e.error_string.strip()}): {_AUDIO_FIX}") from None
    except Exception as e:  # noqa: BLE001 - soundfile's other failures on corrupt files
        raise MediaError(f"unreadable audio {name!r} ({_one_line(e)}): {_AUDIO_FIX}") from None
    return fit_rate(pcm.mean(axis=1, dtype=np.float32), rate, sample_rate, name)


def fit_rate(mono: np.ndarray, rate: int, sample_rate: int, name: str) -> tuple[np.ndarray, str | None]:
    """A mono clip at `rate` -> (float32 `[T]` at `sample_rate`, a note when it was
    resampled, else None); an empty clip is a MediaError naming `name`."""
    if mono.size == 0:
        raise MediaError(f"empty audio {name!r}: it holds no samples; leave it out")
    mono = np.ascontiguousarray(mono, np.float32)
    if rate != sample_rate:
        return resample(mono, rate, sample_rate), f"resampled audio {name!r} from {rate} Hz to {sample_rate} Hz"
    return mono, None


def resample(wave: np.ndarray, rate: int, to: int) -> np.ndarray:
    """float `[T]` at `rate` -> float32 `[T']` at `to` (soxr, RESAMPLE_QUALITY); the
    same array when the rates agree or it is empty."""
    if rate == to or len(wave) == 0:
        return wave
    return soxr.resample(np.asarray(wave, np.float32), rate, to, quality=RESAMPLE_QUALITY).astype(np.float32)


read_wav = read_audio
"""The name callers used when only PCM .wav was read; the same function."""


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """float `[T]` in [-1, 1] (clipped) -> 16-bit mono PCM .wav: sample = rint(x * 32767)."""
    path = Path(path)
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise MediaError(f"cannot write {str(path)!r}: expected mono audio [T], got shape {list(audio.shape)}")
    pcm = np.clip(np.rint(audio.astype(np.float64) * 32767), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    soundfile.write(buf, pcm, int(sample_rate), format="WAV", subtype="PCM_16")
    _write_atomic(path, buf.getvalue())
