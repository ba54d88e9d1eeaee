"""Pictures of the demo's results, drawn with numpy alone: captioned sample grids and
training curves, lettered in a built-in bitmap font.

    render_text(text, scale)            uint8 [h, w, 3]: `text` in the 5 x 9 font
    wrap_text(text, max_chars)          greedy word wrap
    image_grid(images, captions)        images in a grid, each captioned under it
    line_plot(series, title, logy=...)  a line chart with ticks, grid and legend

Images are uint8 `[H, W, 3]` RGB arrays, written by megamm.media.write_png.
"""
from __future__ import annotations

import math

import numpy as np

from megamm.media import as_rgb


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
