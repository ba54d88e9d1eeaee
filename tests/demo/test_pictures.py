"""megamm/demo/pictures.py: image grids (captions drawn by Pillow) and line plots (drawn
by matplotlib) show what they are given."""
import itertools
import math

import numpy as np
import pytest

from megamm.demo import pictures


def test_wrap_text():
    assert pictures.wrap_text("dark green eight on bright cyan", 16) == ["dark green eight", "on bright cyan"]
    assert pictures.wrap_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert pictures.wrap_text("one two three four five six", 7, max_lines=2) == ["one two", "three.."]
    assert pictures.wrap_text("", 5) == []
    # by pixel width in the captions' font
    font = pictures.caption_font()
    caption = "bright magenta seven on dark yellow"
    lines = pictures.wrap_text(caption, 60, measure=font.getlength)
    assert " ".join(lines) == caption and len(lines) > 1
    assert all(font.getlength(line) <= 60 for line in lines)
    assert all(font.getlength(f"{a} {b.split()[0]}") > 60 for a, b in itertools.pairwise(lines))  # greedy


def test_image_grid_layout():
    images = [np.full((7, 5, 3), 10 * i, np.uint8) for i in range(10)]
    grid = pictures.image_grid(images, columns=4, scale=3, pad=2)
    assert grid.shape == (3 * 21 + 4 * 2, 4 * 15 + 5 * 2, 3)
    assert np.array_equal(grid[2: 23, 2: 17], np.zeros((21, 15, 3), np.uint8))  # image 0, scaled
    y, x = 2 + 23 * 1, 2 + 17 * 2  # image 6: row 1, column 2
    assert (grid[y: y + 21, x: x + 15] == 60).all()
    assert (grid[:2] == 255).all() and (grid[:, -2:] == 255).all()  # white padding
    assert (grid[2 + 23 * 2:, 2 + 17 * 2:] == 255).all()  # no 11th and 12th cells

    # captions under 20-pixel cells (23 with the gap): at most 3 lines of the captions' font
    line_h = pictures.caption_line_height()
    assert 10 <= line_h <= 20
    captions = ["ab", "abc def", "one two three four"] + ["x"] * 7
    with_caps = pictures.image_grid(images, captions, columns=4, scale=4, pad=3)
    caption_h = 2 + line_h * 3
    assert with_caps.shape == (3 * (28 + caption_h) + 4 * 3, 4 * 20 + 5 * 3, 3)
    under = [with_caps[3 + 28: 3 + 28 + caption_h, x: x + 20] for x in (3, 26, 49)]
    assert (under[0] < 128).any() and not (under[0][2 + line_h:] < 128).any()  # "ab": 1 line
    assert (under[1][2 + line_h:] < 128).any() and not (under[1][2 + 2 * line_h:] < 128).any()  # 2 lines
    assert (under[2][2 + 2 * line_h:] < 128).any()  # cut at the third
    assert (with_caps[3 + 28: 3 + 28 + caption_h, 3: 23] < 255).any(axis=2).sum() > 10
    one_line = pictures.image_grid(images[:2], ["ab", "cd"], scale=4, pad=3)
    assert one_line.shape == (28 + 2 + line_h + 2 * 3, 2 * 20 + 3 * 3, 3)
    assert not np.array_equal(one_line, pictures.image_grid(images[:2], ["ab", "ce"], scale=4, pad=3))
    single = pictures.image_grid([np.zeros((4, 4), np.uint8)], columns=8, scale=1, pad=0)
    assert single.shape == (4, 4, 3)
    with pytest.raises(ValueError, match="image 1"):
        pictures.image_grid([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        pictures.image_grid([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])


def _count(img, colour, tolerance=0):
    """Pixels within `tolerance` (per channel) of `colour`."""
    return int((np.abs(img.astype(int) - np.asarray(colour)) <= tolerance).all(axis=2).sum())


def test_line_plot_draws_each_series():
    steps = np.arange(0, 1000, 5)
    series = {
        "loss": [(s, 5 * math.exp(-s / 300) + 2) for s in steps],
        "loss_text": [(s, 4 * math.exp(-s / 200) + 1.5) for s in steps],
        "loss_image": [(s, 3.0) for s in steps],
        "val_loss": [(s, 5 * math.exp(-s / 300) + 2.2) for s in steps[::40]] + [(1000, float("nan"))],
    }
    for logy in (False, True):
        img = pictures.line_plot(series, title="run", size=(480, 300), logy=logy)
        assert img.shape == (300, 480, 3) and img.dtype == np.uint8
        for i in range(len(series)):
            assert _count(img, pictures.PALETTE[i], 8) > 300, (logy, i)  # a line across the chart
        assert _count(img, pictures.PALETTE[len(series)], 8) == 0
        assert (img < 80).all(axis=2).sum() > 1000  # axes, ticks and text in black
    # the flat series is a horizontal line: its pixels sit on a few rows mid-chart
    img = pictures.line_plot({"flat": [(0, 3.0), (10, 3.0)]}, size=(300, 200))
    rows = np.nonzero((img == pictures.PALETTE[0]).all(axis=2).sum(axis=1) > 100)[0]
    assert 1 <= len(rows) <= 3 and 40 < rows[0] < 160
    # nothing to draw is still a chart (a lone point, a series without points, no series)
    for empty in ({"one": [(3, 1.0)]}, {"none": []}, {}):
        for logy in (False, True):
            assert pictures.line_plot(empty, size=(200, 150), logy=logy).shape == (150, 200, 3)
    with pytest.raises(ValueError, match="at least"):
        pictures.line_plot({}, size=(100, 100))
