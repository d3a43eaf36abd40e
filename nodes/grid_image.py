"""A labelled XY grid picture from cell images, drawn with Pillow (no SD knowledge here).

Layout (``grid_layout``): a title band on top (the axis titles, and the z value when there is one), a header
row with one label per x value, a header column with one label per y value, then the cells in row-major
order. Every cell is as large as the largest image; small images are scaled up by a whole factor (nearest
neighbour, so each source pixel stays exact) until the cell is at least ``MIN_CELL`` pixels, and an image
smaller than its cell sits in the top-left corner on the background. ``render_label`` draws one label, so a
test can check every label of a grid on its own.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 192        # px: cells of a 64 px model are scaled up 3x
FONT_PX = 16
PAD = 6
LINE_PX = FONT_PX + 4
MAX_LABEL_LINES = 6
HEADER_COL_PX = 200   # width of the y labels' column
GAP = 4               # px between cells
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@lru_cache(maxsize=1)
def font():
    try:
        return ImageFont.load_default(size=FONT_PX)  # FreeType font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def wrap(text: str, width_px: int) -> list[str]:
    """Lines of ``text`` that fit ``width_px`` (at most MAX_LABEL_LINES; the last one ends in '...' if cut)."""
    f, lines = font(), []
    for paragraph in str(text).splitlines() or [""]:
        chars = max(4, int(width_px / max(1.0, f.getlength("x"))))
        for line in textwrap.wrap(paragraph, chars) or [""]:
            while len(line) > 1 and f.getlength(line) > width_px:  # proportional font: shrink to fit
                line = line[:-1]
            lines.append(line)
    if len(lines) > MAX_LABEL_LINES:
        lines = lines[:MAX_LABEL_LINES]
        lines[-1] = lines[-1][:-3] + "..."
    return lines


def render_label(text: str, size: tuple[int, int]) -> Image.Image:
    """One label box: the text wrapped to the box width, left-aligned from the top-left padding."""
    w, h = size
    im = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(wrap(text, w - 2 * PAD)):
        draw.text((PAD, PAD + i * LINE_PX), line, fill=INK, font=font())
    return im


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    def crop(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.w, self.y + self.h)


@dataclass(frozen=True)
class GridLayout:
    size: tuple[int, int]
    scale: int                          # whole-number upscale of every cell image
    title: Box
    x_labels: tuple[Box, ...]
    y_labels: tuple[Box, ...]
    cells: dict                         # (xi, yi) -> Box


def _label_height(texts, width: int) -> int:
    lines = max((len(wrap(t, width - 2 * PAD)) for t in texts), default=1)
    return 2 * PAD + lines * LINE_PX


def grid_layout(cell_size: tuple[int, int], x_labels: list[str], y_labels: list[str], title: str) -> GridLayout:
    """Where everything goes, for cells whose largest image is ``cell_size`` (w, h)."""
    w, h = cell_size
    scale = max(1, -(-MIN_CELL // max(w, h)))  # ceil: the cell's long side reaches MIN_CELL
    cw, ch = w * scale, h * scale
    nx, ny = len(x_labels), len(y_labels)
    total_w = HEADER_COL_PX + nx * (cw + GAP)
    title_h = _label_height([title], total_w)
    head_h = _label_height(x_labels, cw)
    top = title_h + head_h
    xs = tuple(Box(HEADER_COL_PX + i * (cw + GAP), title_h, cw, head_h) for i in range(nx))
    ys = tuple(Box(0, top + j * (ch + GAP), HEADER_COL_PX, ch) for j in range(ny))
    cells = {(i, j): Box(xs[i].x, ys[j].y, cw, ch) for j in range(ny) for i in range(nx)}
    return GridLayout((total_w, top + ny * (ch + GAP)), scale, Box(0, 0, total_w, title_h), xs, ys, cells)


def render_grid(images: dict, x_labels: list[str], y_labels: list[str], title: str) -> Image.Image:
    """The grid picture; ``images[(xi, yi)]`` is the PIL image of that cell (RGB)."""
    size = (max(im.width for im in images.values()), max(im.height for im in images.values()))
    layout = grid_layout(size, x_labels, y_labels, title)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    canvas.paste(render_label(title, (layout.title.w, layout.title.h)), layout.title.crop()[:2])
    for box, text in [*zip(layout.x_labels, x_labels, strict=True),
                      *zip(layout.y_labels, y_labels, strict=True)]:
        canvas.paste(render_label(text, (box.w, box.h)), (box.x, box.y))
    for key, box in layout.cells.items():
        im = images[key].convert("RGB")
        im = im.resize((im.width * layout.scale, im.height * layout.scale), Image.Resampling.NEAREST)
        canvas.paste(im, (box.x, box.y))
    return canvas
