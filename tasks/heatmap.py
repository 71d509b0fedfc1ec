"""Pictures of similarities, drawn with Pillow and numpy only (no matplotlib in the stack).

Two figures: a similarity matrix with image thumbnails on both axes and a colour bar, and a token-grid
overlay (one value per token, upsampled onto the image). Colours come from a small viridis-like
table: perceptually ordered (lightness rises monotonically), so brighter always means higher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Viridis sampled at 8 evenly spaced points; linear interpolation between them stays monotone in lightness.
VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84),
        (70, 50, 126),
        (54, 92, 141),
        (39, 127, 142),
        (31, 161, 135),
        (74, 193, 109),
        (160, 218, 57),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def colormap_table(steps: int = 256) -> np.ndarray:
    """(steps, 3) uint8 lookup table interpolated from VIRIDIS_ANCHORS."""
    at = np.linspace(0.0, 1.0, len(VIRIDIS_ANCHORS))
    t = np.linspace(0.0, 1.0, steps)
    channels = [np.interp(t, at, VIRIDIS_ANCHORS[:, c]) for c in range(3)]
    return np.clip(np.round(np.stack(channels, -1)), 0, 255).astype(np.uint8)


_TABLE = colormap_table()


def colorize(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """values (any shape) -> uint8 RGB (..., 3); lo maps to the darkest colour, hi to the brightest."""
    span = hi - lo if hi > lo else 1.0
    t = np.clip((np.asarray(values, np.float64) - lo) / span, 0.0, 1.0)
    return _TABLE[np.round(t * (len(_TABLE) - 1)).astype(np.intp)]


def value_range(values: np.ndarray, rel_tol: float = 1e-5) -> tuple[float, float]:
    """(min, max) of the finite values. A range within float noise (e.g. token norms right after a
    LayerNorm) is widened around its middle, so rounding noise is not stretched over the whole colormap."""
    finite = np.asarray(values, np.float64)[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    tol = rel_tol * max(1.0, abs(lo), abs(hi))
    if hi - lo > tol:
        return lo, hi
    mid = (lo + hi) / 2
    return mid - tol, mid + tol


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_on(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black text on light colours, white on dark ones."""
    r, g, b = rgb[:3]
    return INK if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def fit_thumbnail(image: Image.Image, size: int) -> Image.Image:
    """IMAGE scaled to fit a size x size square (aspect kept, centred on white)."""
    scale = size / max(image.width, image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    tile = Image.new("RGB", (size, size), BACKGROUND)
    tile.paste(
        image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), ((size - w) // 2, (size - h) // 2)
    )
    return tile


def colour_bar(height: int, width: int) -> Image.Image:
    """A vertical bar, brightest (highest) at the top."""
    column = colorize(np.linspace(1.0, 0.0, max(height, 1)), 0.0, 1.0)
    return Image.fromarray(np.repeat(column[:, None, :], width, axis=1))


# -- the similarity matrix -------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel layout of the similarity figure; `size(n)` is the exact PNG size for n images."""

    cell_max: int = 64  # px per cell (and per thumbnail) for small sets
    cell_min: int = 4  # large sets shrink cells down to this
    grid_max: int = 1024  # the matrix is drawn at most this wide while cells stay >= cell_min
    margin: int = 12
    title_h: int = 20
    bar_gap: int = 14
    bar_w: int = 16
    bar_label_w: int = 44
    min_cell_for_values: int = 40  # write the score inside a cell when cells are at least this big

    def cell(self, n: int) -> int:
        return max(self.cell_min, min(self.cell_max, self.grid_max // max(n, 1)))

    def size(self, n: int) -> tuple[int, int]:
        c = self.cell(n)
        width = self.margin + c + n * c + self.bar_gap + self.bar_w + self.bar_label_w + self.margin
        height = self.margin + self.title_h + c + n * c + self.margin
        return width, height


def similarity_heatmap(
    matrix: np.ndarray, thumbs: Sequence[Image.Image], title: str, layout: HeatmapLayout = HeatmapLayout()
) -> Image.Image:
    """The N x N matrix as coloured cells, image i's thumbnail left of row i and above column i."""
    n = len(matrix)
    if len(thumbs) != n:
        raise ValueError(f"{len(thumbs)} thumbnails for a {n} x {n} matrix")
    c = layout.cell(n)
    canvas = Image.new("RGB", layout.size(n), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((layout.margin, layout.margin), title, fill=INK, font=font)
    x0 = layout.margin + c  # matrix origin: right of the row thumbnails,
    y0 = layout.margin + layout.title_h + c  # below the column thumbnails
    for i, thumb in enumerate(thumbs):
        tile = fit_thumbnail(thumb, c)
        canvas.paste(tile, (x0 + i * c, y0 - c))
        canvas.paste(tile, (x0 - c, y0 + i * c))
    lo, hi = value_range(matrix)
    cells = colorize(matrix, lo, hi)
    canvas.paste(Image.fromarray(np.repeat(np.repeat(cells, c, axis=0), c, axis=1)), (x0, y0))
    if c >= layout.min_cell_for_values:
        for (i, j), v in np.ndenumerate(matrix):
            label = f"{v:.2f}"
            box = draw.textbbox((0, 0), label, font=font)
            tx = x0 + j * c + (c - (box[2] - box[0])) // 2
            ty = y0 + i * c + (c - (box[3] - box[1])) // 2 - box[1]
            draw.text((tx, ty), label, fill=_text_on(cells[i, j]), font=font)
    bx = x0 + n * c + layout.bar_gap
    canvas.paste(colour_bar(n * c, layout.bar_w), (bx, y0))
    draw.rectangle((bx - 1, y0 - 1, bx + layout.bar_w, y0 + n * c), outline=INK)
    for frac, value in ((0.0, hi), (0.5, (lo + hi) / 2), (1.0, lo)):
        y = y0 + round(frac * (n * c - 1))
        draw.line((bx + layout.bar_w, y, bx + layout.bar_w + 3, y), fill=INK)
        box = draw.textbbox((0, 0), f"{value:.3f}", font=font)
        ty = min(max(y - (box[3] + box[1]) // 2, y0 - c), y0 + n * c - box[3])
        draw.text((bx + layout.bar_w + 5, ty), f"{value:.3f}", fill=INK, font=font)
    return canvas


# -- the token grid --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverlayLayout:
    """Pixel layout of the token figure: the image scaled to `display` px on its longer side, a caption."""

    display: int = 512
    min_width: int = 360  # tall, narrow images get white side bands so the caption fits
    caption_h: int = 40
    alpha: float = 0.55  # heatmap opacity over the image
    outside_dim: float = 0.35  # brightness of image parts the model never sees (DINOv2's crop)

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        scale = self.display / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def size(self, width: int, height: int) -> tuple[int, int]:
        w, h = self.image_size(width, height)
        return max(w, self.min_width), h + self.caption_h


def token_overlay(
    image: Image.Image,
    values: np.ndarray,
    region: tuple[float, float, float, float],
    caption: str,
    mark: tuple[int, int] | None = None,
    layout: OverlayLayout = OverlayLayout(),
) -> Image.Image:
    """IMAGE with one colour per token blended over REGION (left, top, right, bottom, source pixels).

    values: (grid_h, grid_w). Token blocks stay visible (nearest upsampling); `mark` outlines one token.
    """
    gh, gw = values.shape
    w, h = layout.image_size(image.width, image.height)
    scale = w / image.width, h / image.height
    shown = image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    left, top = round(region[0] * scale[0]), round(region[1] * scale[1])
    right, bottom = max(left + 1, round(region[2] * scale[0])), max(top + 1, round(region[3] * scale[1]))
    lo, hi = value_range(values)
    heat = Image.fromarray(colorize(values, lo, hi)).resize(
        (right - left, bottom - top), Image.Resampling.NEAREST
    )
    inside = shown.crop((left, top, right, bottom))
    blended = Image.blend(inside, heat, layout.alpha)
    shown = Image.eval(shown, lambda p: int(p * layout.outside_dim))  # what the model does not see
    shown.paste(blended, (left, top))
    draw = ImageDraw.Draw(shown)
    if mark is not None:
        r, col = mark
        cw, ch = (right - left) / gw, (bottom - top) / gh
        box = (left + col * cw, top + r * ch, left + (col + 1) * cw - 1, top + (r + 1) * ch - 1)
        draw.rectangle(box, outline=(255, 255, 255), width=2)
        draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), outline=(0, 0, 0), width=1)
    canvas = Image.new("RGB", layout.size(image.width, image.height), BACKGROUND)
    canvas.paste(shown, ((canvas.width - w) // 2, 0))
    _caption(canvas, h, caption, lo, hi, layout)
    return canvas


def _caption(canvas: Image.Image, top: int, text: str, lo: float, hi: float, layout: OverlayLayout) -> None:
    """Caption text on the first line; a horizontal colour bar with its range on the second."""
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((6, top + 4), text, fill=INK, font=font)
    y = top + layout.caption_h - 16
    low, high = f"{lo:.3g}", f"{hi:.3g}"
    lw = draw.textbbox((0, 0), low, font=font)[2]
    hw = draw.textbbox((0, 0), high, font=font)[2]
    bar_w = max(8, min(200, canvas.width - lw - hw - 30))
    draw.text((6, y), low, fill=INK, font=font)
    bar = colour_bar(bar_w, 10).transpose(Image.Transpose.ROTATE_270)  # brightest at the right
    canvas.paste(bar, (6 + lw + 6, y + 1))
    draw.text((6 + lw + 12 + bar_w, y), high, fill=INK, font=font)
