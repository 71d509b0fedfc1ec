"""Compare a handful of images (cosine matrix) and look inside one (its token grid, its token count).

Interactive work for `towerflow compare` and `towerflow tokens`: plain functions, no Prefect, no lake.
Bad input raises InputError (a ValueError) or FileNotFoundError with a one-line message.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from storage.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from storage.sources import IMAGE_EXTENSIONS

EMBED_CHUNK = 16  # images decoded and embedded together: memory stays bounded for any set size
THUMB_PX = 64  # thumbnails are kept at this size (the largest heatmap cell)
MAX_COMPARE = 1024  # an N x N picture beyond this is unreadable; dedup and cluster scale instead
MODES = ("norm", "similarity")


class InputError(ValueError):
    """Something the user passed cannot be used (the CLI prints it as one line, exit 2)."""


# -- compare ---------------------------------------------------------------------------------------


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files and URLs as given; a directory becomes its image files (by extension, sorted, not recursive)."""
    out: list[str] = []
    for item in items:
        if "://" in item:
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise InputError(
                    f"{item}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in directory"
                )
            out.extend(found)
        elif path.exists():
            out.append(item)
        else:
            raise FileNotFoundError(errno.ENOENT, "No such image file or directory", item)
    return out


def display_names(paths: Sequence[str]) -> list[str]:
    """Short unique labels: local paths relative to their common parent directory; URLs as given."""
    local = [os.path.abspath(p) for p in paths if "://" not in p]
    root = os.path.commonpath([os.path.dirname(p) for p in local]) if local else ""
    return [p if "://" in p else os.path.relpath(os.path.abspath(p), root) for p in paths]


def read_thumbnails(paths: Sequence[str], size: int = THUMB_PX) -> list[Image.Image]:
    """Decode every image once, keeping only a thumbnail: an unreadable file fails before any model loads."""
    thumbs = []
    for path in paths:
        try:
            image = load_image(path)
        except ImageDecodeError as e:
            raise InputError(f"cannot read image {path}: {e.reason} ({e.message})") from e
        image.thumbnail((size, size), Image.Resampling.BILINEAR)
        thumbs.append(image)
    return thumbs


def embed_pooled(enc: Any, paths: Sequence[str], pooling: str | None, chunk: int = EMBED_CHUNK) -> np.ndarray:
    """(N, D) float32 pooled vectors, CHUNK images per embed call."""
    parts = [
        np.asarray(enc.embed(paths[i : i + chunk], pooling, patches=False).pooled, dtype=np.float32)
        for i in range(0, len(paths), chunk)
    ]
    return np.concatenate(parts) if parts else np.empty((0, enc.dim), np.float32)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """(N, N) float32 cosine similarities: exactly symmetric, ones on the diagonal, within [-1, 1]."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = v / np.maximum(norms, 1e-12)
    sims = np.clip(unit @ unit.T, -1.0, 1.0)
    sims = (sims + sims.T) / 2
    np.fill_diagonal(sims, 1.0)
    return sims.astype(np.float32)


@dataclass(frozen=True)
class Pair:
    i: int
    j: int
    score: float


def extreme_pairs(matrix: np.ndarray) -> tuple[Pair, Pair]:
    """(most similar, least similar) pair of distinct images; ties go to the first in row-major order."""
    n = len(matrix)
    if n < 2:
        raise InputError(f"need at least 2 images to compare, got {n}")
    rows, cols = np.triu_indices(n, k=1)
    scores = matrix[rows, cols]
    hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
    return (
        Pair(int(rows[hi]), int(cols[hi]), float(scores[hi])),
        Pair(int(rows[lo]), int(cols[lo]), float(scores[lo])),
    )


def matrix_paths(out_png: Path) -> tuple[Path, Path]:
    """The .npy and .csv written next to the heatmap PNG (same stem)."""
    return out_png.with_suffix(".npy"), out_png.with_suffix(".csv")


def write_matrix(out_png: Path, names: Sequence[str], matrix: np.ndarray) -> tuple[Path, Path]:
    """MATRIX as .npy (float32) and as .csv with the image names as header row and first column."""
    npy, csv_path = matrix_paths(out_png)
    np.save(npy, matrix)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *names])
        for name, row in zip(names, matrix, strict=True):
            writer.writerow([name, *(f"{float(v):.7f}" for v in row)])
    return npy, csv_path


# -- tokens ----------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (width, height); sizes the decoder would refuse are refused here too."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise InputError(f"expected an image size WIDTHxHEIGHT, such as 1920x1080, got {text!r}")
    width, height = int(m[1]), int(m[2])
    if width * height > DEFAULT_MAX_PIXELS:
        raise InputError(f"{width}x{height} is over the decoder's limit of {DEFAULT_MAX_PIXELS} pixels")
    return width, height


def parse_token(text: str) -> tuple[int, int]:
    """'ROW,COL' -> (row, col), zero-based."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not m:
        raise InputError(f"--token expects ROW,COL (zero-based, e.g. 3,5), got {text!r}")
    return int(m[1]), int(m[2])


def token_values(
    patches: np.ndarray, grid: tuple[int, int], mode: str, token: tuple[int, int] | None = None
) -> np.ndarray:
    """(grid_h, grid_w) per-token L2 norms, or cosine similarities to TOKEN (row, col)."""
    gh, gw = grid
    tokens = np.asarray(patches, dtype=np.float64)
    if tokens.shape[0] != gh * gw:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill a {gh} x {gw} grid")
    norms = np.linalg.norm(tokens, axis=1)
    if mode == "norm":
        return norms.reshape(gh, gw)
    if mode != "similarity":
        raise InputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    r, c = token if token is not None else (gh // 2, gw // 2)
    if not (0 <= r < gh and 0 <= c < gw):
        raise InputError(
            f"token {r},{c} is outside the {gh} x {gw} token grid (rows 0-{gh - 1}, cols 0-{gw - 1})"
        )
    unit = tokens / np.maximum(norms, 1e-12)[:, None]
    return np.clip(unit @ unit[r * gw + c], -1.0, 1.0).reshape(gh, gw)


def _patch_tower(enc: Any) -> Any:
    """The single tower whose tokens `embed(...).patches` returns (dual: its Qwen tower)."""
    return getattr(enc, "qwen", enc)


def token_region(enc: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a WIDTH x HEIGHT image the token grid covers: all of it, except after a centre crop."""
    proc = getattr(_patch_tower(enc), "processor", None)
    if not getattr(proc, "do_center_crop", False):
        return 0.0, 0.0, float(width), float(height)
    size, crop = proc.size, proc.crop_size
    if getattr(size, "shortest_edge", None):
        sx = sy = size.shortest_edge / min(width, height)
    else:
        sx, sy = size.width / width, size.height / height
    cw, ch = min(crop.width, width * sx) / sx, min(crop.height, height * sy) / sy
    left, top = (width - cw) / 2, (height - ch) / 2
    return left, top, left + cw, top + ch


def default_preprocessor(name: str) -> Any:
    """A preprocess-only encoder with the released model's preprocessing (no checkpoint needed)."""
    import torch

    import encoders

    cls = encoders.get_encoder_class(name)
    if not hasattr(cls, "default_processor_kwargs"):
        parts = getattr(sys.modules[cls.__module__], "PARTS", ())  # dual: tokens come from its first tower
        if not parts:
            raise InputError(f"{name} has no released default preprocessing; pass --weights")
        return default_preprocessor(parts[0])
    processor = cls.processor_class(**cls.default_processor_kwargs())
    return cls(None, processor, device=torch.device("cpu"), revision="", config=cls.config_class())


@dataclass(frozen=True)
class TokenCount:
    """What an image of `size` (w, h) becomes: `tokens` on a `grid` (h, w), as `embed(...).patches` holds."""

    model: str
    size: tuple[int, int]
    input_size: tuple[int, int]  # (w, h) of the pixels the tower sees
    tokens: int
    grid: tuple[int, int]
    patch_size: int
    merge: int  # 1: no merger; 2: each token merges 2 x 2 patches
    patches: int  # before the merger
    has_cls: bool  # a CLS token exists and is not counted
    preprocessing: str  # 'checkpoint' or 'released default'

    def describe(self) -> list[str]:
        w, h = self.size
        if self.merge > 1:
            kind = (
                f"merged tokens (each merges {self.merge}x{self.merge} patches of {self.patch_size} px; "
                f"{self.patches} patches before the merger)"
            )
        else:
            kind = f"patch tokens ({self.patch_size} px patches" + (
                "; CLS not counted)" if self.has_cls else ")"
            )
        return [
            f"model:         {self.model} ({self.preprocessing} preprocessing)",
            f"image:         {w}x{h} (width x height)",
            f"model input:   {self.input_size[0]}x{self.input_size[1]}",
            f"tokens:        {self.tokens} {kind}",
            f"grid:          {self.grid[0]} x {self.grid[1]} tokens (h x w)",
        ]


def count_tokens(pre: Any, model: str, width: int, height: int, preprocessing: str) -> TokenCount:
    """Token count and grid of a WIDTH x HEIGHT image, exactly as the model's own processor computes them.

    A blank image goes through the real preprocessing (no model runs): that is the only source of the
    grid shape, and it costs well under a second for ordinary sizes.
    """
    tower = _patch_tower(pre)
    prepared = tower.preprocess_image(Image.new("RGB", (width, height)))
    merge = int(tower.merge) if tower.has_merger else 1
    if prepared.grid_thw is not None:
        _, ph, pw = prepared.grid_thw
        patch = int(tower.processor.patch_size)
        grid = (ph // merge, pw // merge)
        input_size = (pw * patch, ph * patch)
    else:
        patch = int(tower.patch_size)
        _, ih, iw = prepared.pixel_values.shape
        ph, pw = ih // patch, iw // patch
        grid, input_size = (ph, pw), (iw, ih)
    tokens = int(pre.num_tokens(height, width))
    if tokens != grid[0] * grid[1]:  # both come from the same processor; a mismatch is a bug
        raise RuntimeError(f"{model}: num_tokens says {tokens}, the processor's grid is {grid}")
    return TokenCount(
        model, (width, height), input_size, tokens, grid, patch, merge, ph * pw, tower.has_cls, preprocessing
    )
