"""Helpers shared by tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np
from PIL import Image

ENCODERS = ("qwen2_5_vl", "qwen3_vl", "glm4v", "dinov2", "dual")
TOWERS = ("qwen2_5_vl", "qwen3_vl", "glm4v", "dinov2")
PACKED = ("qwen2_5_vl", "qwen3_vl", "glm4v")


def smooth_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A photo-like image (gradients + a disc), not noise: resampling differences stay realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c = rng.uniform(0.2, 0.8, size=(3, 3))
    arr = np.stack(
        [c[i, 0] * x / width + c[i, 1] * y / height + c[i, 2] * np.sin(x / 7 + i) for i in range(3)], -1
    )
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, min(height, width) / 4
    arr[(y - cy) ** 2 + (x - cx) ** 2 < r * r] *= 0.3
    return Image.fromarray(np.clip(arr / arr.max() * 255, 0, 255).astype(np.uint8))


def run_cli(argv: list, capsys) -> tuple[int, str, list[str]]:
    """`towerflow ARGV` in-process: (exit code, stdout, non-empty stderr lines)."""
    from flows.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]
