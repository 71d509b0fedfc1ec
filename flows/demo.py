"""The pre-flow demo: a generated corpus, a tiny checkpoint per encoder, every encoder embedding it.

`towerflow demo` shows the whole encoder contract on one machine without downloads: varied images
(sizes, aspect ratios, formats, modes, an EXIF-rotated JPEG) plus two broken files that must become
error lines, not crashes. The embed flow (Prefect + Ray: plan, decode, embed, commit) will replace the
middle part; corpus generation and the printed report stay the demo's own.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

import encoders
from storage.images import ImageDecodeError, load_image

# (format, mode) cycled over the corpus; JPEG cannot hold alpha or a palette, so those go to PNG/WebP.
KINDS = (
    ("JPEG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("PNG", "P"),
    ("JPEG", "L"), ("WEBP", "RGBA"), ("PNG", "L"), ("PNG", "RGB"),
)  # fmt: skip
# width / height: 16:9, square, 4:3, 3:4, 9:16, very wide, very tall. Period 7 against KINDS' 8 mixes them.
# Image 0 (16:9, JPEG) carries EXIF orientation 6: stored wide, upright tall.
ASPECTS = (16 / 9, 1.0, 4 / 3, 3 / 4, 9 / 16, 3.0, 1 / 3)
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
EXIF_ORIENTATION = 0x0112
CHECKPOINT_MARKERS = ("config.json", "towerflow.json")


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    images: int = 24
    seed: int = 0


# -- corpus ----------------------------------------------------------------------------------------
def _size(rng: np.random.Generator, aspect: float) -> tuple[int, int]:
    """(width, height) with both sides in 60..400 and roughly the requested aspect ratio."""
    long = int(rng.integers(120, 401))
    short = max(60, round(long / max(aspect, 1 / aspect)))
    return (long, short) if aspect >= 1 else (short, long)


def _picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth two-colour gradient at a random angle with a few shapes: structure, not noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx / width * np.cos(angle) + yy / height * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    img = Image.fromarray((c0 + t[..., None] * (c1 - c0)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse((x0, y0, x1 + 4, y1 + 4), fill=fill)
        elif shape == 1:
            draw.rectangle((x0, y0, x1 + 4, y1 + 4), fill=fill)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    return img


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if mode == "L":
        return img.convert("L")
    if mode == "P":
        return img.quantize(colors=64)
    if mode == "RGBA":  # alpha fades from opaque centre to translucent edges: exercises compositing
        w, h = img.size
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
        alpha = np.clip(255 - 160 * r, 40, 255).astype(np.uint8)
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha, "L"))
        return rgba
    return img


def make_corpus(directory: Path, n: int, seed: int) -> list[Path]:
    """N varied images plus two broken files, deterministic from SEED; returns every path written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        fmt, mode = KINDS[i % len(KINDS)]
        width, height = _size(rng, ASPECTS[i % len(ASPECTS)])
        img = _to_mode(_picture(rng, width, height), mode)
        save: dict[str, Any] = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
        tag = f"{width}x{height}-{mode}"
        if i == 0:  # stored sideways with orientation 6: decoders must rotate it upright
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6
            save["exif"] = exif.tobytes()
            tag += "-exif6"
        path = directory / f"{i:03d}-{tag}.{EXTENSIONS[fmt]}"
        img.save(path, fmt, **save)
        paths.append(path)
    buf = io.BytesIO()
    _picture(rng, 200, 150).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    truncated = directory / "broken-truncated.jpg"
    truncated.write_bytes(data[: len(data) * 6 // 10])
    text = directory / "broken-not-an-image.png"
    text.write_text("this is a text file wearing a .png name\n")
    return paths + [truncated, text]


# -- checkpoints, decode, embed --------------------------------------------------------------------
def ensure_checkpoint(name: str, directory: Path, seed: int) -> bool:
    """Write NAME's tiny checkpoint unless DIRECTORY already holds one; True when written."""
    if any((directory / m).exists() for m in CHECKPOINT_MARKERS):
        return False
    encoders.make_checkpoint(name, directory, seed=seed)
    return True


def decode_all(paths: list[Path]) -> tuple[list[Path], list[Image.Image], list[dict[str, str]]]:
    """Decode once for all encoders; a bad file becomes an error record with the loader's reason."""
    good, images, errors = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            good.append(path)
        except ImageDecodeError as e:
            message = e.message.removeprefix(f"{path}: ")  # the file is already named
            errors.append({"file": path.name, "reason": e.reason, "message": message})
    return good, images, errors


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Corpus -> checkpoints -> decode -> embed with every registered encoder; prints, returns a summary."""
    if cfg.images < 1:
        raise ValueError(f"images must be at least 1, got {cfg.images}")
    out = Path(cfg.out)
    files = make_corpus(out / "corpus", cfg.images, cfg.seed)
    print(f"corpus: {cfg.images} images + 2 broken files in {out / 'corpus'} (seed {cfg.seed})")

    t0 = time.perf_counter()
    good, images, errors = decode_all(files)
    print(f"decode: {len(good)}/{len(files)} files in {time.perf_counter() - t0:.2f} s")
    exif = [(p, img) for p, img in zip(good, images, strict=True) if "exif6" in p.name]
    for p, img in exif:
        with Image.open(p) as stored:
            w, h = stored.size
        print(f"        {p.name}: EXIF orientation 6, stored {w}x{h} -> upright {img.width}x{img.height}")

    header = ["encoder", "revision", "pooled", "dtype out/model", "device", "images", "tokens/image",
              "load s", "embed s", "checkpoint"]  # fmt: skip
    rows, summary = [header], {}
    for name in encoders.available():
        ckpt_dir = out / "checkpoints" / name
        written = ensure_checkpoint(name, ckpt_dir, cfg.seed)
        t0 = time.perf_counter()
        enc = encoders.load(name, weights=ckpt_dir)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = enc.embed(images)
        t_embed = time.perf_counter() - t0
        tokens = [h * w for h, w in res.grids]
        info = {
            "revision": enc.revision,
            "shape": tuple(res.pooled.shape),
            "dtype": str(res.pooled.dtype),
            "model_dtype": str(enc.dtype).removeprefix("torch."),
            "device": str(enc.device),
            "images": len(res),
            "tokens": (min(tokens), max(tokens)) if tokens else (0, 0),
            "load_s": t_load,
            "embed_s": t_embed,
            "checkpoint": "written" if written else "reused",
        }
        summary[name] = info
        rows.append([name, enc.revision, str(info["shape"]), f"{info['dtype']}/{info['model_dtype']}",
                     info["device"], str(len(res)), "{}..{}".format(*info["tokens"]), f"{t_load:.2f}",
                     f"{t_embed:.2f}", f"{info['checkpoint']} {ckpt_dir}"])  # fmt: skip
    print()
    print(_table(rows))
    print(f"\nerrors ({len(errors)}):")
    if errors:
        print(_table([["  " + e["file"], e["reason"], e["message"]] for e in errors]))
    return {
        "out": str(out),
        "files": len(files),
        "images": len(good),
        "encoders": summary,
        "errors": errors,
    }
