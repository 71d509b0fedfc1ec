"""PNG contact sheets drawn with Pillow: thumbnails in a grid, each with up to two caption lines.

Shared by the commands that show images (search results, cluster montages, duplicate groups). A
thumbnail whose source is gone or unreadable becomes a grey tile saying "unreadable", so one missing
file never costs the whole picture. Sizes are fixed by the constants below, so callers (and tests)
know a sheet's pixel size in advance: see `sheet_size`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from storage.images import load_image

TILE = 160  # thumbnail box, px (the image is fitted inside, aspect kept)
PAD = 8  # gap between tiles and around the sheet, px
CAPTION = 30  # caption band under each tile: two lines of the default font
MAX_COLS = 6  # tiles per row before wrapping
BORDER = 3  # highlight frame (the query tile), drawn inside the tile box
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (232, 232, 232)
HIGHLIGHT = (31, 97, 191)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
FONT_SIZE = 11


@dataclass
class Tile:
    image: Image.Image  # already a TILE x TILE thumbnail (see load_thumbnail) or any image to fit
    caption: list[str] = field(default_factory=list)  # at most two lines are drawn
    highlight: bool = False


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def placeholder(text: str = "unreadable", size: int = TILE) -> Image.Image:
    """A grey tile with TEXT centred: what a thumbnail of a missing or broken image looks like."""
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, size - 1, size - 1], outline=MUTED)
    draw.line([(0, 0), (size - 1, size - 1)], fill=(180, 180, 180))
    draw.line([(0, size - 1), (size - 1, 0)], fill=(180, 180, 180))
    font = _font()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.rectangle([xy[0] - 3, xy[1] - 2, xy[0] + right + 2, xy[1] + bottom + 2], fill=(200, 200, 200))
    draw.text(xy, text, fill=TEXT, font=font)
    return tile


def fit(image: Image.Image, size: int = TILE) -> Image.Image:
    """IMAGE scaled to fit SIZE x SIZE (never enlarged past 2x), centred on the tile background."""
    image = image.convert("RGB")
    scale = min(size / image.width, size / image.height, 2.0)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    tile = Image.new("RGB", (size, size), TILE_BACKGROUND)
    tile.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return tile


def load_thumbnail(source: Any, size: int = TILE, storage_options: dict | None = None) -> Image.Image:
    """SIZE x SIZE thumbnail of SOURCE (path, URL, bytes, PIL); the "unreadable" tile if it cannot be read."""
    try:
        image = load_image(source, storage_options=storage_options)
    except Exception:  # noqa: BLE001 - any failure (gone, no access, not an image) is shown, not raised
        return placeholder("unreadable", size)
    return fit(image, size)


def sheet_size(n_tiles: int, cols: int | None = None) -> tuple[int, int]:
    """(width, height) in px of a sheet of N_TILES tiles in COLS columns (default min(n, MAX_COLS))."""
    cols = max(1, min(cols or MAX_COLS, n_tiles))
    rows = max(1, -(-n_tiles // cols))
    return cols * TILE + (cols + 1) * PAD, rows * (TILE + CAPTION) + (rows + 1) * PAD


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """TEXT cut from the left (file names end in what matters) to fit WIDTH px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def draw_sheet(tiles: list[Tile], cols: int | None = None) -> Image.Image:
    """Tiles row by row, left to right; captions under each tile (line 1 dark, line 2 muted)."""
    if not tiles:
        raise ValueError("a sheet needs at least one tile")
    cols = max(1, min(cols or MAX_COLS, len(tiles)))
    sheet = Image.new("RGB", sheet_size(len(tiles), cols), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for i, tile in enumerate(tiles):
        row, col = divmod(i, cols)
        x = PAD + col * (TILE + PAD)
        y = PAD + row * (TILE + CAPTION + PAD)
        image = tile.image if tile.image.size == (TILE, TILE) else fit(tile.image)
        sheet.paste(image.convert("RGB"), (x, y))
        if tile.highlight:
            draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=HIGHLIGHT, width=BORDER)
        for line_no, line in enumerate(tile.caption[:2]):
            text = _ellipsize(draw, str(line), font, TILE)
            color = (HIGHLIGHT if tile.highlight else TEXT) if line_no == 0 else MUTED
            draw.text((x, y + TILE + 2 + line_no * (CAPTION // 2)), text, fill=color, font=font)
    return sheet


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write IMAGE as PNG at PATH (parents created) through a temporary name, so no half file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
    return path
