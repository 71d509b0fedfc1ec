"""Vision towers behind one contract: `encoders.load(name, weights=...)` then `enc.embed(images)`.

Each family lives in its own module and registers itself by name; the architectures are
transformers' own classes, loaded from safetensors only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from encoders import dinov2, dual, glm4v, qwen2_5_vl, qwen3_vl  # noqa: F401  (registration)
from encoders._base import EmbedOptions, EmbedResult, Encoder, Prepared
from encoders._registry import UnknownEncoderError, available, get_encoder_class, register_encoder
from encoders._weights import CheckpointError

__all__ = [
    "CheckpointError",
    "EmbedOptions",
    "EmbedResult",
    "Encoder",
    "Prepared",
    "UnknownEncoderError",
    "available",
    "get_encoder_class",
    "load",
    "load_preprocessor",
    "make_checkpoint",
    "register_encoder",
    "save",
]


def load(
    name: str, weights: Any, *, device: str | None = None, dtype: str | None = None, **kwargs: Any
) -> Encoder:
    """Load encoder NAME from a local directory, fsspec URL or hub id (vision-only or full-VLM layout).

    kwargs: storage_options (fsspec), attn_implementation, and preprocessing overrides
    (min_pixels/max_pixels for Qwen and GLM, crop_size for DINOv2).
    """
    return get_encoder_class(name).load(weights, device=device, dtype=dtype, **kwargs)


def load_preprocessor(name: str, weights: Any, **kwargs: Any) -> Encoder:
    """Preprocessing of NAME as the checkpoint defines it, without reading any tensor.

    What CPU decode workers use: `enc.preprocess(image)` and `enc.num_tokens(h, w)` work, `embed` does not.
    """
    return get_encoder_class(name).load_preprocessor(weights, **kwargs)


def save(encoder: Encoder, directory: str | os.PathLike) -> Path:
    """Write ENCODER as a vision-only checkpoint that `load(encoder.name, directory)` reads back."""
    encoder.save(directory)
    return Path(directory)


def make_checkpoint(name: str, directory: str | os.PathLike, layout: str = "vision", seed: int = 0) -> Path:
    """A tiny random-weight checkpoint of NAME (a few MB, seconds) loaded through the real path.

    layout: 'vision' (towerflow's vision-only layout) or 'vlm' (a sharded full-model layout with a
    non-vision shard, as released VLM checkpoints are).
    """
    if layout not in ("vision", "vlm"):
        raise ValueError(f"unknown checkpoint layout {layout!r}; use 'vision' or 'vlm'")
    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not an empty directory; choose a new one")
    get_encoder_class(name).write_tiny_checkpoint(directory, layout=layout, seed=seed)
    return Path(directory)
