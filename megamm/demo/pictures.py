"""Pictures of the demo's results: captioned sample grids (Pillow's ImageDraw and its
default font) and training curves (matplotlib, drawn off-screen by its Agg renderer).
Presentation only: nothing here makes or changes training data.

    wrap_text(text, max_width, measure=len)  greedy word wrap
    image_grid(images, captions)             images in a grid, each captioned under it
    line_plot(series, title, logy=...)       a line chart with ticks, grid and legend

Images are uint8 `[H, W, 3]` RGB arrays, written by megamm.media.write_png.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megamm.media import as_rgb

CAPTION_FONT_SIZE = 11
"""Pixel size of the captions' font, Pillow's built-in default (ImageFont.load_default):
11 is the smallest at which its word gaps read as gaps."""


@lru_cache(maxsize=1)
def caption_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=CAPTION_FONT_SIZE)


def caption_line_height() -> int:
    """Pixels between the tops of two caption lines: the font's ascent + descent."""
    font = caption_font()
    if hasattr(font, "getmetrics"):
        return sum(font.getmetrics())
    return font.getbbox("Ag")[3] + 2


def wrap_text(text: str, max_width: float, max_lines: int | None = None,
              measure: Callable[[str], float] = len) -> list[str]:
    """Greedy word wrap to lines with `measure(line) <= max_width` (default: characters);
    a word too long for a line is cut; past `max_lines` lines the last kept line ends
    with ".." (kept even where ".." alone is wider). A line holds at least one character."""
    def fits(s: str) -> bool:
        return measure(s) <= max_width

    def longest_prefix(word: str) -> int:
        n = 1
        while n < len(word) and fits(word[: n + 1]):
            n += 1
        return n

    lines, current = [], ""
    for word in text.split():
        while not fits(word) and len(word) > 1:
            if current:
                lines.append(current)
                current = ""
            n = longest_prefix(word)
            lines.append(word[:n])
            word = word[n:]
        if current and fits(current + " " + word):
            current += " " + word
        else:
            if current:
                lines.append(current)
            current = word
    if current:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + ".."):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + ".."]
    return lines


def image_grid(images, captions: list[str] | None = None, columns: int = 8, scale: int = 2,
               pad: int = 4, max_lines: int = 3) -> np.ndarray:
    """Images (uint8 `[h, w, 3]` or `[h, w]`, all the same size) in a grid on white, each
    scaled up `scale` times (nearest neighbour) with its caption centred under it in
    black, wrapped to the image width plus the gap (`pad`) and cut at
    `max_lines` lines. Returns uint8
    `[H, W, 3]` with

        C = min(columns, N), R = ceil(N / C)
        W = C * w * scale + (C + 1) * pad
        H = R * (h * scale + caption_h) + (R + 1) * pad
        caption_h = 0 without captions, else 2 + caption_line_height() * (most lines any caption needs)
    """
    images = [as_rgb(np.asarray(im), f"#{i}") for i, im in enumerate(images)]
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
    font, line_h = caption_font(), caption_line_height()
    wrapped = [wrap_text(c, cw + pad, max_lines, font.getlength) for c in captions] if captions else None
    caption_h = 2 + line_h * max(1, max(len(lines) for lines in wrapped)) if wrapped else 0
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    grid = np.full((rows * (ch + caption_h) + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        y = pad + (i // cols) * (ch + caption_h + pad)
        x = pad + (i % cols) * (cw + pad)
        grid[y: y + ch, x: x + cw] = im.repeat(scale, axis=0).repeat(scale, axis=1)
    if not wrapped:
        return grid
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    for i, lines in enumerate(wrapped):
        y = pad + (i // cols) * (ch + caption_h + pad) + ch + 2
        x = pad + (i % cols) * (cw + pad) + cw / 2
        for n, line in enumerate(lines):  # anchor "ma": x is the middle, y the ascender line
            draw.text((x, y + n * line_h), line, fill=(0, 0, 0), font=font, anchor="ma")
    return np.asarray(canvas).copy()


PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
"""Series colours of line_plot, in order (repeating after the tenth): matplotlib's tab10."""
_DPI = 100


def _plain_log_formatter(**kwargs):
    """matplotlib's LogFormatter(**kwargs), which picks the log ticks worth a label, with
    labels written 0.1, 3, 20 rather than 1e-01 or 3 x 10^0."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(**kwargs)


def line_plot(series: dict[str, list[tuple[float, float]]], title: str = "", xlabel: str = "step",
              ylabel: str = "loss", size: tuple[int, int] = (640, 400), logy: bool = False) -> np.ndarray:
    """A line chart drawn by matplotlib -> uint8 `[height, width, 3]` for size = (width, height).

    One line per series in PALETTE order, through its (x, y) points sorted by x; points
    with a non-finite value (or y <= 0 when `logy`) are left out. Axes carry
    matplotlib's ticks, light grid lines, and a legend naming every series.
    """
    # imported here: only reports draw charts, and a training process never loads matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = size
    if width < 160 or height < 120:
        raise ValueError(f"line_plot size must be at least (160, 120), got {size}")
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        pts = np.asarray(list(points), np.float64).reshape(-1, 2)
        pts = pts[np.isfinite(pts).all(axis=1) & ((pts[:, 1] > 0) if logy else True)]
        pts = pts[np.argsort(pts[:, 0], kind="stable")]
        colour = np.asarray(PALETTE[i % len(PALETTE)]) / 255
        ax.plot(pts[:, 0], pts[:, 1], color=colour, linewidth=2, label=name,
                marker="o" if len(pts) == 1 else None)
    if logy:  # tick labels as plain numbers (3, 0.5), not matplotlib's default 3 x 10^0
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_plain_log_formatter())
        ax.yaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, color=(0.88, 0.88, 0.88), linewidth=0.8)
    ax.set_axisbelow(True)
    if series:
        ax.legend(loc="upper right", fontsize="small")
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3]
    out = np.full((height, width, 3), 255, np.uint8)  # the exact size asked for, whatever the rounding
    hh, ww = min(height, rgb.shape[0]), min(width, rgb.shape[1])
    out[:hh, :ww] = rgb[:hh, :ww]
    return out
