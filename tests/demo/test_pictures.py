"""megamm/demo/pictures.py: the bitmap font, image grids and line plots draw what they
are given."""
import math

import numpy as np
import pytest

from megamm.demo import pictures


def test_render_text_draws_each_glyph_in_its_cell():
    assert (pictures.GLYPH_H, pictures.GLYPH_W, pictures.LINE_HEIGHT, pictures.ADVANCE) == (9, 5, 10, 6)
    img = pictures.render_text("a b", color=(10, 20, 30), bg=(250, 240, 230))
    assert img.shape == (pictures.LINE_HEIGHT, 3 * pictures.ADVANCE, 3) and img.dtype == np.uint8
    ink = (img == (10, 20, 30)).all(axis=2)
    assert (ink | (img == (250, 240, 230)).all(axis=2)).all()  # two colours only
    cells = [ink[:, i * pictures.ADVANCE: (i + 1) * pictures.ADVANCE] for i in range(3)]
    assert cells[0].sum() > 8 and cells[2].sum() > 8 and cells[1].sum() == 0
    assert not ink[:, pictures.GLYPH_W].any()  # the gap column between characters stays blank
    # "l" is a stem in the middle column with a foot: known pixels
    ell = (pictures.render_text("l") == 0).all(axis=2)
    assert ell[1:6, 2].all() and ell[6, 1:4].all() and not ell[3, 0] and not ell[3, 4]
    big = pictures.render_text("a b", scale=3)
    assert big.shape == (3 * pictures.LINE_HEIGHT, 9 * pictures.ADVANCE, 3)
    assert np.array_equal((big == 0).all(axis=2)[::3, ::3], (pictures.render_text("a b") == 0).all(axis=2))
    two = pictures.render_text("ab\nc")
    assert two.shape == (2 * pictures.LINE_HEIGHT, 2 * pictures.ADVANCE, 3)


def test_every_glyph_is_different():
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,:;-=></()[]%+_'\"!?*#|~"
    bitmaps = {c: (pictures.render_text(c) == 0).all(axis=2).tobytes() for c in chars}
    assert len(set(bitmaps.values())) == len(chars)
    assert not (pictures.render_text(" ") == 0).any()
    assert np.array_equal(pictures.render_text("ABC"), pictures.render_text("abc"))  # upper case = lower case
    assert (pictures.render_text("\u00e9") == 0).sum() > 10  # a character the font lacks shows as a box
    assert not np.array_equal(pictures.render_text("loss 2.51"), pictures.render_text("loss 2.15"))


def test_wrap_text():
    assert pictures.wrap_text("dark green eight on bright cyan", 16) == ["dark green eight", "on bright cyan"]
    assert pictures.wrap_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert pictures.wrap_text("one two three four five six", 7, max_lines=2) == ["one two", "three.."]
    assert pictures.wrap_text("", 5) == []


def test_image_grid_layout():
    images = [np.full((7, 5, 3), 10 * i, np.uint8) for i in range(10)]
    grid = pictures.image_grid(images, columns=4, scale=3, pad=2)
    assert grid.shape == (3 * 21 + 4 * 2, 4 * 15 + 5 * 2, 3)
    assert np.array_equal(grid[2: 23, 2: 17], np.zeros((21, 15, 3), np.uint8))  # image 0, scaled
    y, x = 2 + 23 * 1, 2 + 17 * 2  # image 6: row 1, column 2
    assert (grid[y: y + 21, x: x + 15] == 60).all()
    assert (grid[:2] == 255).all() and (grid[:, -2:] == 255).all()  # white padding
    assert (grid[2 + 23 * 2:, 2 + 17 * 2:] == 255).all()  # no 11th and 12th cells

    # captions: 5 x 4 = 20 pixels wide cells hold 3 characters a line, at most 3 lines
    captions = ["ab", "abc def", "one two three four"] + ["x"] * 7
    with_caps = pictures.image_grid(images, captions, columns=4, scale=4, pad=3)
    caption_h = 2 + pictures.LINE_HEIGHT * 3
    assert with_caps.shape == (3 * (28 + caption_h) + 4 * 3, 4 * 20 + 5 * 3, 3)
    under_first = with_caps[3 + 28: 3 + 28 + caption_h, 3: 23]
    assert (under_first < 128).any() and not (under_first[2 + pictures.LINE_HEIGHT:] < 128).any()  # 1 line
    one_line = pictures.image_grid(images[:2], ["ab", "cd"], scale=4, pad=3)
    assert one_line.shape == (28 + 2 + pictures.LINE_HEIGHT + 2 * 3, 2 * 20 + 3 * 3, 3)
    single = pictures.image_grid([np.zeros((4, 4), np.uint8)], columns=8, scale=1, pad=0)
    assert single.shape == (4, 4, 3)
    with pytest.raises(ValueError, match="image 1"):
        pictures.image_grid([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        pictures.image_grid([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])


def _count(img, colour):
    return int((img == np.asarray(colour, np.uint8)).all(axis=2).sum())


def test_line_plot_draws_each_series():
    steps = np.arange(0, 1000, 5)
    series = {
        "loss": [(s, 5 * math.exp(-s / 300) + 2) for s in steps],
        "loss_text": [(s, 4 * math.exp(-s / 200) + 1.5) for s in steps],
        "loss_image": [(s, 3.0) for s in steps],
        "val_loss": [(s, 5 * math.exp(-s / 300) + 2.2) for s in steps[::40]] + [(1000, float("nan"))],
    }
    swatch = 16 * 2  # the legend's sample of each colour
    for logy in (False, True):
        img = pictures.line_plot(series, title="run", size=(480, 300), logy=logy)
        assert img.shape == (300, 480, 3) and img.dtype == np.uint8
        for i in range(len(series)):
            assert _count(img, pictures.PALETTE[i]) > swatch + 200, (logy, i)
        assert _count(img, pictures.PALETTE[len(series)]) == 0
        assert (img == 0).all(axis=2).sum() > 1000  # axes, ticks and text in black
    # the flat series is a horizontal line: its pixels sit on one or two rows
    img = pictures.line_plot({"flat": [(0, 3.0), (10, 3.0)]}, size=(300, 200))
    rows = np.nonzero((img == pictures.PALETTE[0]).all(axis=2).sum(axis=1) > 50)[0]
    assert 1 <= len(rows) <= 2 and 40 < rows[0] < 160
    # nothing to draw is still a chart (a lone point, a series without points, no series)
    for empty in ({"one": [(3, 1.0)]}, {"none": []}, {}):
        assert pictures.line_plot(empty, size=(200, 150)).shape == (150, 200, 3)


def test_tick_labels():
    assert pictures._tick_labels([0.0, 0.5, 1.0, 1.5]) == ["0", "0.5", "1", "1.5"]
    assert pictures._tick_labels([0, 2000, 4000]) == ["0", "2000", "4000"]
    assert pictures._tick_labels([0.01, 0.1, 1.0, 10.0]) == ["0.01", "0.1", "1", "10"]
    assert pictures._tick_labels([2e6, 4e6]) == ["2e6", "4e6"]
    assert pictures._nice_ticks(0.0, 1000.0, 5) == [0, 200, 400, 600, 800, 1000]
