"""megamm/media.py: images through Pillow read upright (EXIF orientation), with
transparency on white, in every common format; sized reads crop the centre and say when
they upsample; audio through soundfile reads float, extensible, FLAC and OGG files,
mixes to mono and reports resampling; damaged files are one-line MediaErrors naming the
file. (Grids and plots: tests/demo/test_pictures.py.)"""
import io
import wave

import numpy as np
import pytest
import soundfile
from PIL import Image

from megamm import media
from megamm.media import MediaError

RNG = np.random.default_rng(0)


def _save(path, image: np.ndarray, mode: str | None = None, **kw):
    Image.fromarray(image, mode).save(path, **kw) if mode else Image.fromarray(image).save(path, **kw)
    return path


def _one_line_error(call, path, needle: str) -> str:
    with pytest.raises(MediaError) as err:
        call()
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert repr(str(path)) in message and needle in message, message
    return message


# ---- images: writing ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 13, 3), (1, 1, 3), (13, 5), (2, 31)])
def test_png_round_trip_is_bit_exact(tmp_path, shape):
    image = RNG.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    media.write_png(path, image)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as im:
        assert im.mode == ("RGB" if len(shape) == 3 else "L") and im.size == (shape[1], shape[0])
    back = media.read_image(path)
    expected = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    assert back.dtype == np.uint8 and np.array_equal(back, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left


def test_write_png_refuses_other_arrays(tmp_path):
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(MediaError, match="x.png"):
            media.write_png(tmp_path / "x.png", bad)
    assert not list(tmp_path.iterdir())


# ---- images: reading ---------------------------------------------------------------------
@pytest.mark.parametrize("orientation,turn", [(6, -1), (8, 1), (3, 2)])
def test_exif_rotated_jpeg_reads_upright(tmp_path, orientation, turn):
    # stored 20 x 40 with a red block in its top-left corner; the EXIF tag says how to
    # turn it for display (6: 90 degrees clockwise, 8: counter-clockwise, 3: 180)
    stored = np.full((20, 40, 3), 255, np.uint8)
    stored[:6, :6] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "phone.jpg", stored, exif=exif, quality=95)
    got = media.read_image(path)
    upright = np.rot90(stored, turn)  # np.rot90: positive k turns counter-clockwise
    assert got.shape == upright.shape
    red = (got[:, :, 0] > 200) & (got[:, :, 1] < 60) & (got[:, :, 2] < 60)
    ys, xs = np.nonzero(red)
    want_ys, want_xs = np.nonzero((upright == (255, 0, 0)).all(axis=2))
    assert abs(ys.mean() - want_ys.mean()) < 1 and abs(xs.mean() - want_xs.mean()) < 1
    assert media.read_image(_save(tmp_path / "plain.jpg", stored, quality=95)).shape == (20, 40, 3)


def _over_white(rgb, alpha):
    rgb, alpha = rgb.astype(np.int64), alpha.astype(np.int64)
    return (rgb * alpha + 255 * (255 - alpha) + 127) // 255


def test_transparency_is_composited_onto_white(tmp_path):
    rgb = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (9, 11, 1), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    got = media.read_image(_save(tmp_path / "rgba.png", np.concatenate([rgb, alpha], axis=2), "RGBA"))
    assert np.array_equal(got, _over_white(rgb, alpha))
    assert (got[0, 0] == 255).all() and np.array_equal(got[0, 1], rgb[0, 1])  # clear = white, opaque = itself
    gray = rgb[:, :, 0]
    got = media.read_image(_save(tmp_path / "la.png", np.stack([gray, alpha[:, :, 0]], axis=2), "LA"))
    assert np.array_equal(got, np.repeat(_over_white(gray[:, :, None], alpha), 3, axis=2))
    # a palette image whose entry 0 is transparent (tRNS)
    index = RNG.integers(0, 4, (9, 11), dtype=np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200])
    pal.save(tmp_path / "pal.png", transparency=0)
    colours = np.array([[255, 255, 255], [200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    assert np.array_equal(media.read_image(tmp_path / "pal.png"), colours[index])
    # and the same rule for a [H, W, 4] .npy
    np.save(tmp_path / "rgba.npy", np.concatenate([rgb, alpha], axis=2))
    assert np.array_equal(media.read_image(tmp_path / "rgba.npy"), _over_white(rgb, alpha))


@pytest.mark.parametrize("fmt,options", [("webp", {"lossless": True}), ("tiff", {}), ("bmp", {}),
                                         ("png", {"optimize": True})])
def test_lossless_formats_read_exactly(tmp_path, fmt, options):
    image = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = _save(tmp_path / f"x.{fmt}", image, **options)
    assert np.array_equal(media.read_image(path), image)


def test_gif_reads_its_first_frame_and_16_bit_keeps_the_high_byte(tmp_path):
    frames = [Image.fromarray(np.full((6, 8, 3), v, np.uint8)) for v in (40, 200, 120)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "anim.gif") as im:
        assert im.n_frames == 3
    assert (media.read_image(tmp_path / "anim.gif") == 40).all()
    deep = RNG.integers(0, 65536, (5, 7)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(media.read_image(tmp_path / "deep.png"), np.repeat((deep >> 8)[:, :, None], 3, 2))


def test_sized_reads_crop_the_centre_and_report_upsampling(tmp_path):
    # 30 x 90: a red band left, a blue band right, green in the centred 30 x 30 square
    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, :30], wide[:, 30:60], wide[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out, note = media.read_image_sized(_save(tmp_path / "wide.png", wide), 28)
    assert out.shape == (28, 28, 3) and note is None  # 30 -> 28 is a downsample: nothing to report
    assert (out[:, 2:-2, 1] > 240).all() and (out[:, 2:-2, 0] < 15).all() and (out[:, 2:-2, 2] < 15).all()
    small = _save(tmp_path / "small.png", RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    out, note = media.read_image_sized(small, 28)
    assert out.shape == (28, 28, 3)
    assert note.startswith(f"upsampled image {str(small)!r} from 20x12 to 28x28") and "at least 28" in note
    exact = RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    np.save(tmp_path / "exact.npy", exact)
    out, note = media.read_image_sized(tmp_path / "exact.npy", 28)
    assert np.array_equal(out, exact) and note is None  # the right size is never resampled


def test_npy_images(tmp_path):
    image = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for name, arr, expected in [
        ("rgb.npy", image, image),
        ("gray.npy", image[:, :, 0], np.repeat(image[:, :, :1], 3, axis=2)),
        ("float.npy", image / 255.0, image),
    ]:
        np.save(tmp_path / name, arr)
        assert np.array_equal(media.read_image(tmp_path / name), expected), name
    np.save(tmp_path / "big.npy", image * 2.0)
    with pytest.raises(MediaError, match="big.npy.*dtype float64"):
        media.read_image(tmp_path / "big.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    _one_line_error(lambda: media.read_image(tmp_path / "junk.npy"), tmp_path / "junk.npy", "unreadable image")


def test_damaged_and_missing_images_are_one_line_errors(tmp_path):
    _one_line_error(lambda: media.read_image(tmp_path / "nope.png"), tmp_path / "nope.png", "missing image file")
    photo = _save(tmp_path / "photo.jpg", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), quality=90)
    png = _save(tmp_path / "pic.png", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for good, name in ((photo, "cut.jpg"), (png, "cut.png")):
        cut = tmp_path / name
        cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
        message = _one_line_error(lambda cut=cut: media.read_image(cut), cut, "unreadable image")
        assert "re-save it" in message  # what to do
    (tmp_path / "notes.jpg").write_text("not a picture")
    _one_line_error(lambda: media.read_image(tmp_path / "notes.jpg"), tmp_path / "notes.jpg", "not an image format")


# ---- audio -------------------------------------------------------------------------------
def _sine(rate: int, n: int, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


def test_wav_round_trip_and_resampling_note(tmp_path):
    audio = _sine(16000, 4000)
    media.write_wav(tmp_path / "a.wav", audio, 16000)
    with wave.open(str(tmp_path / "a.wav")) as w:  # plain 16-bit PCM, as the stdlib reads it
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 4000)
    back, note = media.read_wav(tmp_path / "a.wav", 16000)
    assert note is None and back.dtype == np.float32 and back.shape == audio.shape
    assert np.array_equal(back, np.rint(audio.astype(np.float64) * 32767).astype(np.float32) / 32768)
    up, note = media.read_audio(tmp_path / "a.wav", 32000)
    assert up.shape == (8000,) and up.dtype == np.float32
    assert note == f"resampled audio {str(tmp_path / 'a.wav')!r} from 16000 Hz to 32000 Hz"
    assert np.abs(up - _sine(32000, 8000))[100:-100].max() < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


def test_resampling_from_44_1_khz(tmp_path):
    soundfile.write(tmp_path / "cd.flac", _sine(44100, 44100, 1000.0), 44100)
    down, note = media.read_audio(tmp_path / "cd.flac", 16000)
    assert down.shape == (16000,) and "from 44100 Hz to 16000 Hz" in note
    assert np.abs(down - _sine(16000, 16000, 1000.0))[200:-200].max() < 0.01


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
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:  # the stdlib's encoder, independent of soundfile
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(raw)
    mono, note = media.read_wav(tmp_path / "s.wav", 8000)
    assert note is None and mono.shape == (300,)
    assert np.abs(mono - (left + right) / 2).max() <= 2.0 / full + 1e-6


@pytest.mark.parametrize("fmt,subtype,suffix", [("WAV", "FLOAT", "wav"), ("WAV", "DOUBLE", "wav"),
                                                ("WAVEX", "PCM_24", "wav"), ("FLAC", "PCM_16", "flac")])
def test_float_extensible_and_flac_files(tmp_path, fmt, subtype, suffix):
    stereo = np.stack([_sine(16000, 1600), _sine(16000, 1600, 300.0)], axis=1)
    path = tmp_path / f"clip.{suffix}"
    soundfile.write(path, stereo, 16000, format=fmt, subtype=subtype)
    if fmt == "WAVEX":
        assert path.read_bytes()[20:22] == b"\xfe\xff"  # WAVE_FORMAT_EXTENSIBLE, which `wave` refuses
        with pytest.raises(wave.Error):
            wave.open(str(path)).close()
    mono, note = media.read_audio(path, 16000)
    assert note is None and mono.dtype == np.float32 and mono.shape == (1600,)
    tolerance = 1e-6 if subtype in ("FLOAT", "DOUBLE") else 2.0 ** -14
    assert np.abs(mono - stereo.mean(axis=1)).max() < tolerance


def test_ogg_vorbis_reads_close_to_its_source(tmp_path):
    clip = _sine(16000, 8000)
    soundfile.write(tmp_path / "clip.ogg", clip, 16000, format="OGG", subtype="VORBIS")
    back, note = media.read_audio(tmp_path / "clip.ogg", 16000)
    assert note is None and back.shape == clip.shape
    assert np.corrcoef(back[400:-400], clip[400:-400])[0, 1] > 0.99  # lossy, but the same sound


def test_bad_audio_files(tmp_path):
    _one_line_error(lambda: media.read_wav(tmp_path / "gone.wav", 16000), tmp_path / "gone.wav",
                    "missing audio file")
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    _one_line_error(lambda: media.read_wav(tmp_path / "broken.wav", 16000), tmp_path / "broken.wav",
                    "unreadable audio")
    buf = io.BytesIO()
    soundfile.write(buf, _sine(16000, 16000), 16000, format="FLAC")
    for name, data in (("cut.flac", buf.getvalue()[: len(buf.getvalue()) // 2]),
                       ("junk.flac", b"fLaC" + bytes(200))):
        (tmp_path / name).write_bytes(data)
        message = _one_line_error(lambda name=name: media.read_audio(tmp_path / name, 16000), tmp_path / name,
                                  "unreadable audio")
        assert "convert it to WAV or FLAC" in message  # what to do
    media.write_wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    _one_line_error(lambda: media.read_wav(tmp_path / "empty.wav", 16000), tmp_path / "empty.wav", "empty audio")
    with pytest.raises(MediaError, match="mono"):
        media.write_wav(tmp_path / "stereo.wav", np.zeros((10, 2)), 16000)
