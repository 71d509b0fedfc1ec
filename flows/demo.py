"""`make demo`: the main job on embedded defaults, on a generated corpus with tiny checkpoints.

Varied images (sizes, aspect ratios, formats, modes, an EXIF-rotated JPEG) plus broken files go
through `embed_corpus` (local Ray with 2 actors per model, Prefect's temporary API, a local lake);
then the demo shows what users do next: counts, errors by reason, the lake tree, a DuckDB query and
a LanceDB nearest-neighbour lookup. A second run resumes and embeds nothing new.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from PIL import Image, ImageDraw

import encoders

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
    images: int = 300
    seed: int = 0
    models: tuple[str, ...] = ("qwen2_5_vl", "dinov2")
    actors: int = 2


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


# -- checkpoints, run, show -------------------------------------------------------------------------
def ensure_corpus(directory: Path, n: int, seed: int) -> tuple[list[Path], bool]:
    """Generate once: rewriting the files would give them new mtimes, i.e. new input versions."""
    if directory.is_dir() and any(directory.iterdir()):
        return sorted(p for p in directory.iterdir() if p.is_file()), False
    return make_corpus(directory, n, seed), True


def ensure_checkpoint(name: str, directory: Path, seed: int) -> bool:
    """Write NAME's tiny checkpoint unless DIRECTORY already holds one; True when written."""
    if any((directory / m).exists() for m in CHECKPOINT_MARKERS):
        return False
    encoders.make_checkpoint(name, directory, seed=seed)
    return True


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def lake_tree(lake: Path, depth: int = 3) -> list[str]:
    """Directories of the lake with their file counts (the hive layout at a glance)."""
    lines = []
    for d in sorted(p for p in lake.rglob("*") if p.is_dir()):
        rel = d.relative_to(lake)
        if len(rel.parts) > depth or any(part.startswith(".") for part in rel.parts):
            continue
        files = [f for f in d.iterdir() if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        suffix = f"  ({len(files)} files, {size / 1024:.0f} KB)" if files else ""
        lines.append(f"  {'  ' * (len(rel.parts) - 1)}{rel.name}/{suffix}")
    return lines


def duckdb_queries(lake: Path, model: str, dim: int) -> dict[str, list[tuple]]:
    con = duckdb.connect()
    emb = f"read_parquet('{lake}/embeddings/**/*.parquet', hive_partitioning=true)"
    per_model = con.execute(
        f"SELECT model, dataset, count(*) AS images, round(avg(width)) AS avg_w, round(avg(height)) AS avg_h "
        f"FROM {emb} GROUP BY ALL ORDER BY model"
    ).fetchall()
    query = con.execute(
        f"SELECT uri, embedding FROM {emb} WHERE model = ? ORDER BY uri LIMIT 1", [model]
    ).fetchone()
    nearest = con.execute(
        f"SELECT uri, array_cosine_similarity(embedding::FLOAT[{dim}], ?::FLOAT[{dim}]) AS cos FROM {emb} "
        "WHERE model = ? ORDER BY cos DESC LIMIT 4",
        [query[1], model],
    ).fetchall()
    return {"per_model": per_model, "query": [query[:1]], "nearest": nearest}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Corpus -> checkpoints -> `embed_corpus` -> what is in the lake; prints, returns a summary."""
    if cfg.images < 1:
        raise ValueError(f"images must be at least 1, got {cfg.images}")
    from flows.embed import embed_corpus
    from storage.vectors import VectorTable

    out = Path(cfg.out).resolve()
    corpus, fresh = ensure_corpus(out / "corpus", cfg.images, cfg.seed)
    print(f"corpus: {len(corpus)} files in {out / 'corpus'} ({'generated' if fresh else 'reused'})")
    weights = []
    for name in cfg.models:
        ensure_checkpoint(name, out / "checkpoints" / name, cfg.seed)
        weights.append(f"{name}={out / 'checkpoints' / name}")
    lake = out / "lake"
    t0 = time.perf_counter()
    summary = embed_corpus(source=str(out / "corpus"), out=str(lake), model=",".join(cfg.models),
                           weights=",".join(weights), actors=cfg.actors, quiet=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    c = summary["counts"]
    print(f"\nrun {summary['run_id']} ({summary['status']}, {seconds:.1f} s): listed {c['listed']}, "
          f"skipped as done {c['skipped_done']}, embedded {c['embedded']}, errors {c['errors']}")  # fmt: skip
    for reason, n in summary["errors_by_reason"].items():
        print(f"  error {reason}: {n}")
    print(f"\nlake {lake}:")
    print("\n".join(lake_tree(lake)))
    model = cfg.models[0]
    dim = summary["encoders"][0]["dim"]
    sql = duckdb_queries(lake, model, dim)
    print("\nDuckDB: images per model and dataset")
    print(
        _table(
            [["model", "dataset", "images", "avg w", "avg h"]]
            + [[str(v) for v in r] for r in sql["per_model"]]
        )
    )
    print(f"\nDuckDB: nearest to {Path(sql['query'][0][0]).name} by array_cosine_similarity ({model})")
    print(_table([[Path(u).name, f"{s:.4f}"] for u, s in sql["nearest"]]))
    table = VectorTable.open(str(lake), model, dim)
    vector = table.get([table.table.to_arrow()["image_id"][0].as_py()])["vector"][0].as_py()
    hits = table.search(vector, k=4)
    print(f"\nLanceDB ({table.count()} rows, index {summary['index'][model]['index']}): nearest neighbours")
    print(
        _table(
            [
                [Path(u).name, f"{d:.4f}"]
                for u, d in zip(hits["uri"].to_pylist(), hits["_distance"].to_pylist(), strict=True)
            ]
        )
    )
    return {"summary": summary, "seconds": seconds, "sql": sql, "lance_hits": hits.num_rows}
