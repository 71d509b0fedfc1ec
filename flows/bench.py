"""towerflow bench: how fast and how lean the pipeline is, as ratios measured side by side in one run.

ceiling (bare tower forward on pre-batched tensors) vs towerflow end to end (the embed flow, steady
state) vs the naive per-image loop; per-stage seconds, peak memory, FLOPs per image and, on CUDA, MFU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import encoders
from flows.embed import embed_corpus
from tasks.bench import (
    MemorySampler,
    device_peak_flops,
    make_photos,
    measure_ceiling,
    measure_layout_ceiling,
    measure_naive,
    write_checkpoint,
)
from tasks.config import ModelSpec, RunConfig, default_ray_address
from tasks.pipeline import Sizing, actor_sizing, ensure_ray

STAGES = ("read", "decode", "preprocess", "forward", "write", "commit")
CEILING_IMAGES = 256  # enough batches for a stable bare-forward rate; the corpus may be much larger
ADJACENT_CEILING_IMAGES = 128  # the re-measure after each end-to-end run (one pass)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "dinov2"
    size: str = "small"  # tiny | small | real (random weights at the released shape)
    images: int = 200
    scale: tuple[int, ...] = ()
    device: str | None = None
    dtype: str | None = None
    actors: int | None = None
    batch_tokens: int | None = None  # None: the device's default, for the ceiling and the pipeline alike
    batch_images: int = 32
    max_pixels: int | None = None
    out: str = "bench-out"
    seed: int = 0


@task(name="bench-corpus", cache_policy=NO_CACHE)
def corpus(cfg: BenchConfig) -> list[Path]:
    return make_photos(Path(cfg.out) / "corpus", max((cfg.images, *cfg.scale)), cfg.seed)


@task(name="bench-checkpoint", cache_policy=NO_CACHE)
def checkpoint(cfg: BenchConfig) -> Path:
    return write_checkpoint(
        cfg.model, cfg.size, Path(cfg.out) / f"ckpt-{cfg.model}-{cfg.size}", cfg.max_pixels
    )


def _layout(cfg: BenchConfig, weights: Path) -> tuple[dict[str, Any], Sizing]:
    """The load arguments and the actor layout (tasks.pipeline.actor_sizing) the end-to-end run uses,
    on the Ray it uses (RAY_ADDRESS or a local one)."""
    ensure_ray(default_ray_address(None), quiet=True)
    spec = ModelSpec(cfg.model, str(weights), cfg.dtype)
    sizing = actor_sizing(RunConfig(source="-", lake="-", models=(spec,), actors=cfg.actors), 1)
    load = {"name": cfg.model, "weights": str(weights), "device": cfg.device, "dtype": cfg.dtype}
    return load, sizing


def best_ceiling(
    cfg: BenchConfig, weights: Path, paths: list[Path], in_process: float, repeats: int
) -> dict[str, float]:
    """The ceiling is the better of the bare forward in this process (every thread) and the bare
    forward in the pipeline's own actor layout (on a CPU: one single-threaded process per core)."""
    load, sizing = _layout(cfg, weights)
    out = {"in_process": in_process, "layout": None}
    if sizing.actors > 1:
        out["layout"] = measure_layout_ceiling(load, paths, cfg.batch_tokens, sizing, repeats)[0]
    out["best"] = max(v for v in (in_process, out["layout"]) if v)
    return out


@task(name="bench-ceiling-and-naive", cache_policy=NO_CACHE)
def ceiling_and_naive(cfg: BenchConfig, weights: Path, paths: list[Path]) -> dict[str, Any]:
    enc = encoders.load(cfg.model, weights, device=cfg.device, dtype=cfg.dtype)
    ceiling = measure_ceiling(enc, paths, cfg.batch_tokens)
    naive = measure_naive(enc, paths[: min(len(paths), 64)])
    peak = device_peak_flops(enc.device)
    device, dtype = str(enc.device), str(enc.dtype).removeprefix("torch.")
    del enc  # its memory, before the layout's processes load their copies
    best = best_ceiling(cfg, weights, paths, ceiling.images_per_s, repeats=2)
    scale = best["best"] / ceiling.images_per_s
    return {
        "device": device, "dtype": dtype,
        "ceiling_images_per_s": best["best"], "ceiling_tokens_per_s": ceiling.tokens_per_s * scale,
        "ceiling_in_process_images_per_s": best["in_process"], "ceiling_layout_images_per_s": best["layout"],
        "naive_images_per_s": naive, "gflops_per_image": ceiling.flops_per_image / 1e9,
        "peak_tflops": peak / 1e12 if peak else None, "batch_tokens": ceiling.batch_tokens,
        "forwards": ceiling.batches,
    }  # fmt: skip


@task(name="bench-adjacent-ceiling", cache_policy=NO_CACHE)
def adjacent_ceiling(cfg: BenchConfig, weights: Path, paths: list[Path]) -> float:
    """The ceiling again, right after an end-to-end run: a shared machine's speed drifts over a
    long bench (9.6 to 11.0 images/s between runs here), so each ratio takes the higher of the
    ceilings measured just before and just after its run."""
    enc = encoders.load(cfg.model, weights, device=cfg.device, dtype=cfg.dtype)
    in_process = measure_ceiling(enc, paths[:ADJACENT_CEILING_IMAGES], cfg.batch_tokens, repeats=1)
    del enc
    return best_ceiling(cfg, weights, paths[:ADJACENT_CEILING_IMAGES], in_process.images_per_s, 1)["best"]


def end_to_end(cfg: BenchConfig, weights: Path, paths: list[Path], n: int) -> dict[str, Any]:
    """The embed flow over the first N images (a manifest), into a fresh lake."""
    root = Path(cfg.out) / f"e2e-{n}"
    manifest = root / "inputs.txt"
    root.mkdir(parents=True, exist_ok=True)
    manifest.write_text("\n".join(str(p.resolve()) for p in paths[:n]) + "\n")
    lake = root / f"lake-{len(list(root.glob('lake-*')))}"
    with MemorySampler() as mem:
        summary = embed_corpus(
            source=str(manifest), out=str(lake), model=cfg.model, weights=str(weights), actors=cfg.actors,
            dtype=cfg.dtype, batch_tokens=cfg.batch_tokens, batch_images=cfg.batch_images, patches=False,
            quiet=True, max_pixels=cfg.max_pixels,
        )  # fmt: skip
    t = summary["timings"]
    stages = {s: 0.0 for s in STAGES}
    for key, seconds in t.items():
        if key.startswith("stage."):
            stage = key.removeprefix("stage.").split("__")[0]
            stages[stage] = stages.get(stage, 0.0) + seconds
    return {
        "images": n, "embedded": summary["counts"]["embedded"], "errors": summary["counts"]["errors"],
        "wall_s": t["embed"], "first_row_s": t.get("first_row_s"),
        "steady_images_per_s": t.get("steady_images_per_s"), "span_images_per_s": t.get("span_images_per_s"),
        "ms_per_image": {s: 1000 * v / max(1, n) for s, v in stages.items()},
        "driver_rss_mb": mem.driver_peak / 2**20, "worker_rss_max_mb": mem.worker_peak / 2**20,
        "workers_rss_total_mb": mem.workers_peak_total / 2**20,
        "workers_pss_total_mb": mem.workers_pss_peak_total / 2**20, "gpu_peak_mb": mem.gpu_peak / 2**20,
    }  # fmt: skip


def ratios(base: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    main = runs[0]
    steady = main["steady_images_per_s"] or 0.0
    for run in runs:
        run["e2e_vs_ceiling"] = (run["steady_images_per_s"] or 0.0) / run["ceiling_images_per_s"]
    out = {
        "e2e_vs_ceiling": main["e2e_vs_ceiling"],
        "e2e_vs_naive": steady / base["naive_images_per_s"],
    }
    if base["peak_tflops"]:
        out["mfu_ceiling"] = (
            base["ceiling_images_per_s"] * base["gflops_per_image"] / (base["peak_tflops"] * 1e3)
        )
        out["mfu_e2e"] = steady * base["gflops_per_image"] / (base["peak_tflops"] * 1e3)
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        out["rss_growth"] = large["workers_rss_total_mb"] / max(small["workers_rss_total_mb"], 1e-9) - 1
        out["pss_growth"] = large["workers_pss_total_mb"] / max(small["workers_pss_total_mb"], 1e-9) - 1
        per_image = [1 / r["steady_images_per_s"] for r in runs if r["steady_images_per_s"]]
        out["time_per_image_spread"] = (
            (max(per_image) - min(per_image)) / min(per_image) if per_image else None
        )
    return out


def _fmt(value: float | None) -> str:
    return "one actor: same" if value is None else f"{value:.1f}"


def render(cfg: BenchConfig, base: dict[str, Any], runs: list[dict[str, Any]], r: dict[str, Any]) -> str:
    main = runs[0]
    lines = [
        f"# towerflow bench: {cfg.model} ({cfg.size}), {cfg.images} images, {base['device']} {base['dtype']}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| ceiling (bare forward) | {base['ceiling_images_per_s']:.1f} images/s, "
        f"{base['ceiling_tokens_per_s']:.0f} tokens/s; forwards of <= {base['batch_tokens']} tokens; the "
        f"better of one process ({base['ceiling_in_process_images_per_s']:.1f}) and the actors' layout "
        f"({_fmt(base['ceiling_layout_images_per_s'])}) |",
        f"| towerflow end to end, steady state | {main['steady_images_per_s'] or 0:.1f} images/s "
        f"(**{r['e2e_vs_ceiling']:.2f}x** the ceiling; {main['ceiling_images_per_s']:.1f} = the higher "
        "of the ceilings measured just before and just after it); the middle 80% of the images; over "
        f"the whole forward span, ramp-up and drain included: {main['span_images_per_s'] or 0:.1f} |",
        f"| naive per-image loop | {base['naive_images_per_s']:.1f} images/s (towerflow is "
        f"**{r['e2e_vs_naive']:.2f}x** it) |",
        f"| time to first row / whole run | {main['first_row_s']} s / {main['wall_s']} s |",
        "| per-stage worker ms/image | "
        + ", ".join(f"{s} {v:.1f}" for s, v in main["ms_per_image"].items()) + " |",
        f"| peak RSS | driver {main['driver_rss_mb']:.0f} MB, "
        f"largest worker {main['worker_rss_max_mb']:.0f} MB, "
        f"all workers {main['workers_rss_total_mb']:.0f} MB (PSS {main['workers_pss_total_mb']:.0f} MB) |",
        f"| model FLOPs | {base['gflops_per_image']:.2f} GFLOP/image |",
    ]  # fmt: skip
    if "mfu_e2e" in r:
        lines.append(f"| MFU (peak {base['peak_tflops']:.0f} TFLOP/s) | ceiling {r['mfu_ceiling']:.1%}, "
                     f"end to end {r['mfu_e2e']:.1%}; GPU peak {main['gpu_peak_mb']:.0f} MB |")  # fmt: skip
    if len(runs) > 1:
        lines += ["", "| N | steady images/s | ceiling images/s | ratio | wall s | workers RSS MB | "
                  "workers PSS MB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {x['images']} | {x['steady_images_per_s']} | {x['ceiling_images_per_s']:.2f} | "
            f"{x['e2e_vs_ceiling']:.2f}x | {x['wall_s']} | {x['workers_rss_total_mb']:.0f} | "
            f"{x['workers_pss_total_mb']:.0f} |"
            for x in runs
        ]
        lines.append(f"\nworkers' peak memory growth {runs[0]['images']} -> {runs[-1]['images']}: "
                     f"RSS {r['rss_growth']:+.1%}, PSS {r['pss_growth']:+.1%}; "
                     f"time per image spread: {r['time_per_image_spread']:.1%}")  # fmt: skip
    return "\n".join(lines) + "\n"


@flow(name="bench")
def bench(config: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = BenchConfig(**(config or {}))
    paths = corpus(cfg)
    weights = checkpoint(cfg)
    base = ceiling_and_naive(cfg, weights, paths[: min(cfg.images, CEILING_IMAGES)])
    runs, before = [], base["ceiling_images_per_s"]
    for n in (cfg.images, *cfg.scale):
        run = end_to_end(cfg, weights, paths, n)
        after = adjacent_ceiling(cfg, weights, paths)
        run["ceiling_images_per_s"], before = max(before, after), after
        runs.append(run)
    r = ratios(base, runs)
    markdown = render(cfg, base, runs, r)
    result = {"config": asdict(cfg), "baseline": base, "runs": runs, "ratios": r, "markdown": markdown}
    out = Path(cfg.out)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench.md").write_text(markdown)
    create_markdown_artifact(markdown, key="bench")
    return result
