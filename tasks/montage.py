"""Pictures people look at: cluster montages, duplicate groups and a line chart, drawn with Pillow only.

Every picture has a size fixed by the constants below (the montage: by them and the number of rows), so
users and tests know what they get; rows without data stay blank. Thumbnails that cannot be read (a moved
file, a bucket without credentials) become grey "unreadable" tiles: a picture never fails a run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from storage.images import ImageDecodeError, load_image

THUMB = 96  # thumbnail cell, square, in pixels
PAD = 6
LABEL_W = 136  # left column holding each row's label
HEADER = 30  # title band
CAPTION = 14  # text line under each thumbnail
MONTAGE_THUMBS = 8  # nearest-to-centroid thumbnails per cluster
MONTAGE_MAX_ROWS = 24  # clusters drawn at most (the largest ones)
GROUP_THUMBS = 6  # members drawn per duplicate group
GROUP_ROWS = 6  # duplicate groups drawn (the largest ones)
CHART_SIZE = (640, 360)

BACKGROUND = (255, 255, 255)
INK = (25, 25, 25)
MUTED = (110, 110, 110)
GRID = (225, 225, 225)
LINE = (31, 119, 180)
PLACEHOLDER = (205, 205, 205)

Loader = Callable[[str], Image.Image | None]


@dataclass(frozen=True)
class Tile:
    uri: str
    caption: str = ""


@dataclass(frozen=True)
class Row:
    label: str
    detail: str = ""
    tiles: Sequence[Tile] = field(default_factory=tuple)


def caption(value: str, uri: str) -> str:
    """A thumbnail caption: the value, then the file name (the grid cuts what does not fit)."""
    return f"{value} {uri.rstrip('/').rsplit('/', 1)[-1]}"


def grid_size(rows: int, thumbs: int) -> tuple[int, int]:
    """(width, height) of a grid picture of ROWS rows of THUMBS thumbnails."""
    return LABEL_W + thumbs * (THUMB + PAD) + PAD, HEADER + rows * (THUMB + CAPTION + PAD) + PAD


def montage_size(k: int) -> tuple[int, int]:
    """Pixel size of the cluster montage for k clusters."""
    return grid_size(min(k, MONTAGE_MAX_ROWS), MONTAGE_THUMBS)


GROUPS_SIZE = grid_size(GROUP_ROWS, GROUP_THUMBS)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """TEXT cut with an ellipsis so that it fits WIDTH pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_loader(storage_options: dict | None = None) -> Loader:
    """Thumbnail loader: uri -> small RGB image, or None when the image cannot be read."""

    def load(uri: str) -> Image.Image | None:
        try:
            img = load_image(uri, storage_options=storage_options)
        except (ImageDecodeError, OSError, ValueError):
            return None
        img.thumbnail((THUMB, THUMB))
        return img

    return load


def _paste_tile(canvas: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, tile: Tile, loader, font):
    img = loader(tile.uri)
    if img is None:
        draw.rectangle([x, y, x + THUMB - 1, y + THUMB - 1], fill=PLACEHOLDER)
        draw.text((x + 8, y + THUMB // 2 - 6), "unreadable", fill=MUTED, font=font)
    else:
        canvas.paste(img, (x + (THUMB - img.width) // 2, y + (THUMB - img.height) // 2))
    draw.text((x, y + THUMB + 1), _fit(draw, tile.caption, THUMB, font), fill=MUTED, font=font)


def draw_grid(title: str, rows: Sequence[Row], n_rows: int, thumbs: int, loader: Loader) -> Image.Image:
    """Rows of thumbnails under a title; exactly n_rows x thumbs cells whatever `rows` holds."""
    canvas = Image.new("RGB", grid_size(n_rows, thumbs), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((PAD, 8), _fit(draw, title, canvas.width - 2 * PAD, font), fill=INK, font=font)
    for r, row in enumerate(rows[:n_rows]):
        y = HEADER + r * (THUMB + CAPTION + PAD)
        draw.text((PAD, y + 4), _fit(draw, row.label, LABEL_W - 2 * PAD, font), fill=INK, font=font)
        draw.text((PAD, y + 20), _fit(draw, row.detail, LABEL_W - 2 * PAD, font), fill=MUTED, font=font)
        for t, tile in enumerate(row.tiles[:thumbs]):
            _paste_tile(canvas, draw, LABEL_W + t * (THUMB + PAD), y, tile, loader, font)
    return canvas


def _tick_labels(lo: float, hi: float, n: int = 5) -> list[tuple[float, str]]:
    """N evenly spaced ticks over [lo, hi], with enough significant digits to tell neighbours apart."""
    step = (hi - lo) / (n - 1)
    top = max(abs(lo), abs(hi), step)
    digits = max(3, math.ceil(math.log10(top / step)) + 2, math.floor(math.log10(top)) + 1)
    return [(lo + step * i, f"{lo + step * i:.{digits}g}") for i in range(n)]


def line_chart(values: Sequence[float], title: str, subtitle: str = "", xlabel: str = "") -> Image.Image:
    """A line chart of VALUES against 1..len(VALUES), CHART_SIZE pixels, with labelled axes."""
    width, height = CHART_SIZE
    canvas = Image.new("RGB", CHART_SIZE, BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((PAD + 4, 8), _fit(draw, title, width - 20, font), fill=INK, font=font)
    draw.text((PAD + 4, 26), _fit(draw, subtitle, width - 20, font), fill=MUTED, font=font)
    vals = [float(v) for v in values if math.isfinite(float(v))]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    ticks = _tick_labels(lo - 0.08 * span, hi + 0.08 * span)
    lo, hi = ticks[0][0], ticks[-1][0]
    left = 14 + max(int(draw.textlength(label, font=font)) for _, label in ticks)
    right, top, bottom = width - 20, 52, height - 42
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=1)
    label_x = (left + right) // 2 - int(draw.textlength(xlabel, font=font)) // 2
    draw.text((label_x, height - 18), xlabel, fill=MUTED, font=font)
    if not vals:
        draw.text((left + 10, (top + bottom) // 2), "no data", fill=MUTED, font=font)
        return canvas
    for tick, label in ticks:
        y = bottom - (tick - lo) / (hi - lo) * (bottom - top)
        draw.line([(left + 1, y), (right, y)], fill=GRID)
        draw.text((left - 6 - draw.textlength(label, font=font), y - 6), label, fill=MUTED, font=font)
    n = len(vals)
    points = [
        (
            left + (right - left) * (0.5 if n == 1 else i / (n - 1)),
            bottom - (v - lo) / (hi - lo) * (bottom - top),
        )
        for i, v in enumerate(vals)
    ]
    for i in range(0, n, max(1, math.ceil(n / 12))):
        x = points[i][0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        draw.text((x - 4, bottom + 6), str(i + 1), fill=MUTED, font=font)
    if n > 1:
        draw.line(points, fill=LINE, width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=LINE)
    return canvas


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
