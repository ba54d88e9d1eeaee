"""megamm/media.py: PNG written to spec and read back bit-exact; PNGs as other encoders
write them (every row filter, bit depth and colour type, interlaced) decode to the
pixels they hold; damaged files are one-line MediaErrors naming the file; wav round
trips. (The bitmap font, grids and plots: tests/demo/test_pictures.py.)"""
import struct
import sys
import wave
import zlib

import numpy as np
import pytest

from megamm import media
from megamm.media import MediaError


# ---- a reference PNG encoder, byte by byte, independent of the decoder under test ---------
def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_rows(rows: list[bytes], bpp: int, filters) -> bytes:
    """Filter each scanline with filters[i % len(filters)], as an encoder would."""
    out, prev = bytearray(), bytes(len(rows[0]))
    for i, row in enumerate(rows):
        ftype = filters[i % len(filters)]
        out.append(ftype)
        for j, x in enumerate(row):
            a = row[j - bpp] if j >= bpp else 0
            b = prev[j]
            c = prev[j - bpp] if j >= bpp else 0
            pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[ftype]
            out.append((x - pred) % 256)
        prev = row
    return bytes(out)


def _pack_rows(samples: np.ndarray, depth: int) -> list[bytes]:
    """int samples [h, w, ch] -> packed big-endian scanlines of `depth` bits per sample."""
    h, w, ch = samples.shape
    if depth == 16:
        return [samples[y].astype(">u2").tobytes() for y in range(h)]
    if depth == 8:
        return [samples[y].astype(np.uint8).tobytes() for y in range(h)]
    bits = ((samples.reshape(h, w * ch)[:, :, None] >> np.arange(depth - 1, -1, -1)) & 1).reshape(h, -1)
    return [np.packbits(bits[y].astype(np.uint8)).tobytes() for y in range(h)]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def encode_png(samples, colour_type, depth, filters=(0, 1, 2, 3, 4), palette=None, interlace=False) -> bytes:
    samples = np.asarray(samples).reshape(samples.shape[0], samples.shape[1], -1)
    h, w, ch = samples.shape
    bpp = max(1, ch * depth // 8)
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = samples[y0::dy, x0::dx]
        if sub.size:
            raw += _filter_rows(_pack_rows(sub, depth), bpp, filters)
    data = zlib.compress(raw, 9)
    out = media.PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0,
                                                            int(interlace)))
    out += _chunk(b"tEXt", b"Comment\x00ancillary chunks are skipped")
    if palette is not None:
        out += _chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
        out += _chunk(b"tRNS", bytes(len(palette)))
    cut = len(data) // 2  # image data split over two IDAT chunks, as streaming encoders do
    return out + _chunk(b"IDAT", data[:cut]) + _chunk(b"IDAT", data[cut:]) + _chunk(b"IEND", b"")


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        out.append((data[pos + 4: pos + 8], data[pos + 8: pos + 8 + length]))
        pos += 12 + length
    return out


RNG = np.random.default_rng(0)


# ---- PNG ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 13, 3), (1, 1, 3), (13, 5), (2, 31)])
def test_png_round_trip_is_bit_exact_and_to_spec(tmp_path, shape):
    image = RNG.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    media.write_png(path, image)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    chunks = _chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, colour_type, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (h, w, depth, colour_type) == (shape[0], shape[1], 8, 2 if len(shape) == 3 else 0)
    raw = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(h, -1)
    assert (raw[:, 0] == 0).all() and raw[:, 1:].tobytes() == image.tobytes()  # filter 0 + the pixels
    back = media.read_image(path)
    assert back.dtype == np.uint8 and back.shape == (h, w, 3)
    expected = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    assert np.array_equal(back, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left


def test_write_png_refuses_other_arrays(tmp_path):
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(MediaError, match="x.png"):
            media.write_png(tmp_path / "x.png", bad)
    assert not list(tmp_path.iterdir())


def _case(name):
    """(png bytes, expected uint8 [h, w, 3]) for each kind of PNG encoders write."""
    h, w = 11, 13
    rgb = RNG.integers(0, 256, (h, w, 3))
    alpha = RNG.integers(0, 256, (h, w, 1))
    gray = RNG.integers(0, 256, (h, w, 1))
    palette = RNG.integers(0, 256, (16, 3))
    index = RNG.integers(0, 16, (h, w, 1))
    grey3 = lambda g: np.repeat(g, 3, axis=2)  # noqa: E731
    if name == "rgb":
        return encode_png(rgb, 2, 8), rgb
    if name == "rgba":
        return encode_png(np.concatenate([rgb, alpha], axis=2), 6, 8), rgb
    if name == "gray":
        return encode_png(gray, 0, 8), grey3(gray)
    if name == "gray_alpha":
        return encode_png(np.concatenate([gray, alpha], axis=2), 4, 8), grey3(gray)
    if name.startswith("palette"):
        depth = int(name[7:])
        idx = index % (1 << depth)
        return encode_png(idx, 3, depth, palette=palette[: 1 << depth]), palette[idx[:, :, 0]]
    if name in ("gray1", "gray2", "gray4"):
        depth = int(name[4:])
        g = RNG.integers(0, 1 << depth, (h, w, 1))
        return encode_png(g, 0, depth), grey3(g * 255 // ((1 << depth) - 1))
    if name == "rgb16":
        deep = RNG.integers(0, 65536, (h, w, 3))
        return encode_png(deep, 2, 16), deep >> 8
    if name == "rgba16":
        deep = RNG.integers(0, 65536, (h, w, 4))
        return encode_png(deep, 6, 16), deep[:, :, :3] >> 8
    if name == "gray16":
        deep = RNG.integers(0, 65536, (h, w, 1))
        return encode_png(deep, 0, 16), grey3(deep >> 8)
    if name == "interlaced_rgb":
        return encode_png(rgb, 2, 8, interlace=True), rgb
    if name == "interlaced_palette2":
        idx = index % 4
        return encode_png(idx, 3, 2, palette=palette[:4], interlace=True), palette[idx[:, :, 0]]
    raise KeyError(name)


CASES = ["rgb", "rgba", "gray", "gray_alpha", "palette8", "palette4", "palette2", "palette1", "gray1",
         "gray2", "gray4", "rgb16", "rgba16", "gray16", "interlaced_rgb", "interlaced_palette2"]


@pytest.mark.parametrize("name", CASES)
def test_reads_pngs_of_every_kind_and_row_filter(tmp_path, name):
    data, expected = _case(name)
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    assert np.array_equal(media.read_image(path), np.asarray(expected, np.uint8))


@pytest.mark.parametrize("ftype", [1, 2, 3, 4])
def test_each_row_filter_alone(tmp_path, ftype):
    # one filter throughout, on a gradient and on low-contrast noise (where the Paeth
    # predictor's ties between its up and up-left candidates happen often)
    y, x = np.mgrid[0:9, 0:17]
    gradient = np.stack([(7 * x + 3 * y) % 256, (x * y) % 256, np.full_like(x, 200 - ftype)], axis=2)
    noise = 100 + RNG.integers(0, 4, (9, 17, 3))
    for image in (gradient, noise):
        (tmp_path / "f.png").write_bytes(encode_png(image, 2, 8, filters=(ftype,)))
        assert np.array_equal(media.read_image(tmp_path / "f.png"), image.astype(np.uint8))


def _damaged(data: bytes, how: str) -> bytes:
    idat = data.index(b"IDAT")
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "no_iend":
        return data[:-12]
    if how == "bit_flip":  # a byte of image data: the IDAT CRC no longer matches
        return data[: idat + 6] + bytes([data[idat + 6] ^ 0x40]) + data[idat + 7:]
    if how == "bad_zlib":  # garbage image data with a valid CRC
        return (data[:8] + _chunk(b"IHDR", _chunks(data)[0][1]) + _chunk(b"IDAT", b"\x00not zlib at all")
                + _chunk(b"IEND", b""))
    if how == "short_data":  # valid zlib stream holding fewer bytes than the image needs
        return (data[:8] + _chunk(b"IHDR", _chunks(data)[0][1]) + _chunk(b"IDAT", zlib.compress(b"\x00" * 10))
                + _chunk(b"IEND", b""))
    if how == "bad_filter":
        ihdr = _chunks(data)[0][1]
        w, h = struct.unpack(">II", ihdr[:8])
        raw = bytes([7] + [0] * 3 * w) * h
        return data[:8] + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    if how == "not_png":
        return b"GIF89a" + data[6:]
    raise KeyError(how)


@pytest.mark.parametrize("how,needle", [("truncated", "truncated"), ("no_iend", "no IEND"),
                                        ("bit_flip", "bad CRC in the IDAT chunk"),
                                        ("bad_zlib", "corrupt PNG image data"),
                                        ("short_data", "truncated PNG image data"),
                                        ("bad_filter", "filter type 7"), ("not_png", "not a PNG")])
def test_damaged_png_is_one_line_error_naming_the_file(tmp_path, monkeypatch, how, needle):
    monkeypatch.setitem(sys.modules, "PIL", None)  # the same answer whether Pillow is installed or not
    path = tmp_path / "damaged.png"
    path.write_bytes(_damaged(_case("rgb")[0], how))
    with pytest.raises(MediaError) as err:
        media.read_image(path)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert message.startswith(f"unreadable image {str(path)!r}") and needle in message
    assert "\n" not in message


def test_missing_and_foreign_files(tmp_path, monkeypatch):
    with pytest.raises(MediaError, match=r"missing image file '.*nope\.png'"):
        media.read_image(tmp_path / "nope.png")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    with pytest.raises(MediaError, match=r"cannot read \.jpg image '.*photo\.jpg' without Pillow"):
        media.read_image(jpeg)


def test_npy_images(tmp_path):
    image = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for name, arr, expected in [
        ("rgb.npy", image, image),
        ("gray.npy", image[:, :, 0], np.repeat(image[:, :, :1], 3, axis=2)),
        ("rgba.npy", np.concatenate([image, image[:, :, :1]], axis=2), image),
        ("float.npy", image / 255.0, image),
    ]:
        np.save(tmp_path / name, arr)
        assert np.array_equal(media.read_image(tmp_path / name), expected), name
    np.save(tmp_path / "big.npy", image * 2.0)
    with pytest.raises(MediaError, match="big.npy.*dtype float64"):
        media.read_image(tmp_path / "big.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(MediaError, match="unreadable image .*junk.npy"):
        media.read_image(tmp_path / "junk.npy")


# ---- WAV ---------------------------------------------------------------------------------
def test_wav_round_trip_and_resampling_note(tmp_path):
    t = np.arange(4000) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    media.write_wav(tmp_path / "a.wav", audio, 16000)
    back, note = media.read_wav(tmp_path / "a.wav", 16000)
    assert note is None and back.dtype == np.float32 and back.shape == audio.shape
    assert np.array_equal(back, np.rint(audio.astype(np.float64) * 32767).astype(np.float32) / 32768)
    up, note = media.read_wav(tmp_path / "a.wav", 32000)
    assert up.shape == (8000,) and note == f"resampled audio {str(tmp_path / 'a.wav')!r} from 16000 Hz to 32000 Hz"
    assert np.abs(up[::2] - back)[50:-50].max() < 0.01  # even output samples sit on the input ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_sample_widths_and_channels_mix_to_mono(tmp_path, width):
    left = RNG.uniform(-0.9, 0.9, 300)
    right = -0.5 * left
    full = 2 ** (8 * width - 1)
    ints = np.rint(np.stack([left, right], axis=1) * (full - 1)).astype(np.int64)  # [T, 2]
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.reshape(-1))
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(raw)
    mono, note = media.read_wav(tmp_path / "s.wav", 8000)
    assert note is None and mono.shape == (300,)
    assert np.abs(mono - (left + right) / 2).max() <= 2.0 / full + 1e-6


def test_bad_wav_files(tmp_path):
    with pytest.raises(MediaError, match=r"missing audio file '.*gone\.wav'"):
        media.read_wav(tmp_path / "gone.wav", 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(MediaError, match=r"unreadable audio '.*broken\.wav'"):
        media.read_wav(tmp_path / "broken.wav", 16000)
    media.write_wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(MediaError, match="empty audio"):
        media.read_wav(tmp_path / "empty.wav", 16000)
    with pytest.raises(MediaError, match="mono"):
        media.write_wav(tmp_path / "stereo.wav", np.zeros((10, 2)), 16000)
