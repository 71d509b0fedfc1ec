"""Benchmark parts: photo-like corpus, sized random checkpoints, ceiling, naive loop, memory, FLOPs.

Every figure of one report is measured in the same process on the same machine, so ratios (pipeline
vs bare forward, vs naive loop) are meaningful even where absolute numbers are not.
"""

from __future__ import annotations

import copy
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

import encoders
from encoders._base import default_batch_tokens, plan_batches

# random-weight configs per (encoder, size); "real" are the released towers' shapes
SIZES: dict[tuple[str, str], dict[str, Any]] = {
    ("dinov2", "small"): dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518),
    ("dinov2", "real"): dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518),
    ("qwen2_5_vl", "small"): dict(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6,
                                  out_hidden_size=768, window_size=112, fullatt_block_indexes=[3, 7]),
    ("qwen2_5_vl", "real"): dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                 out_hidden_size=3584, window_size=112,
                                 fullatt_block_indexes=[7, 15, 23, 31]),
}  # fmt: skip
ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)
# dense fp16/bf16 peaks (FLOP/s) by device name fragment, most specific first
PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12))


def make_photos(directory: Path, n: int, seed: int = 0, sides: tuple[int, int] = (300, 1600)) -> list[Path]:
    """Photo-sized JPEGs (smooth light, shapes, sensor-like noise): realistic decode cost and file size."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = directory / f"photo-{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        long = int(rng.integers(sides[0], sides[1] + 1))
        aspect = ASPECTS[i % len(ASPECTS)]
        w, h = (long, max(32, round(long / aspect))) if aspect >= 1 else (max(32, round(long * aspect)), long)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(40, 215, 3) + 60 * np.sin(
            xx[..., None] / rng.uniform(40, 400) + yy[..., None] / 300
        )
        img = Image.fromarray(np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(10, max(11, long // 5)))
            draw.ellipse(
                (x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
            )
        img.save(path, "JPEG", quality=90)
    return paths


def write_checkpoint(model: str, size: str, directory: Path, max_pixels: int | None = None) -> Path:
    """A random-weight checkpoint of MODEL at SIZE ('tiny' or a SIZES entry), written once."""
    if (directory / "config.json").exists():
        return directory
    cls = encoders.get_encoder_class(model)
    if size == "tiny":
        return encoders.make_checkpoint(model, directory)
    if (model, size) not in SIZES:
        raise ValueError(f"no {size!r} benchmark size for {model}; sizes: tiny, small, real")
    torch.manual_seed(0)
    net = cls.model_class._from_config(cls.config_class(**SIZES[(model, size)])).eval()
    overrides = cls.processor_overrides(max_pixels=max_pixels) if max_pixels else {}
    processor = cls.processor_class(**{**cls.default_processor_kwargs(), **overrides})
    cls(net, processor, device=torch.device("cpu"), revision="-").save(directory)
    return directory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Ceiling:
    images_per_s: float
    tokens_per_s: float
    flops_per_image: float
    batches: int
    batch_tokens: int


@dataclass
class BareInputs:
    """Pre-decoded, pre-batched model inputs already on the device, packed as the actors pack them."""

    inputs: list[Any]
    images: int
    tokens: int
    budget: int


def bare_inputs(enc: encoders.Encoder, paths: list[Path], batch_tokens: int | None) -> BareInputs:
    budget = default_batch_tokens(enc.device, batch_tokens)
    prepared = [enc.preprocess(p) for p in paths]
    batches = plan_batches([p.seq_len for p in prepared], budget, [enc.batch_key(p) for p in prepared])
    inputs = [enc.collate([prepared[i] for i in b]) for b in batches]
    enc.run_collated(inputs[0])  # warm-up: allocator, kernels, lazy init
    _sync(enc.device)
    return BareInputs(inputs, len(paths), sum(p.seq_len for p in prepared), budget)


def time_forwards(enc: encoders.Encoder, bare: BareInputs, repeats: int) -> float:
    """Seconds of one pass of the bare forward over every batch (mean of REPEATS passes)."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        for x in bare.inputs:
            enc.run_collated(x)
    _sync(enc.device)
    return (time.perf_counter() - t0) / repeats


def measure_ceiling(
    enc: encoders.Encoder, paths: list[Path], batch_tokens: int | None, repeats: int = 2
) -> Ceiling:
    """The bare tower forward in this process, packed by the token budget the pipeline's actors use
    (None: the device's default)."""
    bare = bare_inputs(enc, paths, batch_tokens)
    seconds = time_forwards(enc, bare, repeats)
    sample = [enc.preprocess(p) for p in paths[: min(4, len(paths))]]
    with FlopCounterMode(display=False) as counter:
        for p in sample:
            enc.run_collated(enc.collate([p]))
    return Ceiling(
        bare.images / seconds, bare.tokens / seconds, counter.get_total_flops() / len(sample),
        len(bare.inputs), bare.budget,
    )  # fmt: skip


class LayoutCeilingWorker:
    """One process of the actors' layout: its own model copy, its threads, its share of the images."""

    def __init__(self, load: dict[str, Any], paths: list[Path], batch_tokens: int | None, threads: int):
        torch.set_num_threads(threads)
        self.enc = encoders.load(**load)
        self.bare = bare_inputs(self.enc, paths, batch_tokens)

    def run(self, repeats: int) -> tuple[int, int, float]:
        return self.bare.images, self.bare.tokens, time_forwards(self.enc, self.bare, repeats)


def measure_layout_ceiling(
    load: dict[str, Any], paths: list[Path], batch_tokens: int | None, sizing: Any, repeats: int = 2
) -> tuple[float, float]:
    """(images/s, tokens/s) of the bare forward run side by side in SIZING's layout (tasks.pipeline:
    actors x threads, in Ray actors like the pipeline's): the ceiling of that layout, which on a CPU can
    beat one process with every core's threads. Each worker times its own loop; all start together
    once every model is loaded, and the slowest bounds the rate."""
    import ray

    worker = ray.remote(num_cpus=0, num_gpus=sizing.gpus_per_actor)(LayoutCeilingWorker)
    shares = [paths[i :: sizing.actors] for i in range(sizing.actors)]
    actors = [worker.remote(load, share, batch_tokens, sizing.threads) for share in shares if share]
    try:
        ray.get([a.__ray_ready__.remote() for a in actors])  # every model loaded before any clock starts
        results = ray.get([a.run.remote(repeats) for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    seconds = max(r[2] for r in results)  # the last to finish bounds the layout's rate
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results) / seconds


def naive_model(enc: encoders.Encoder) -> torch.nn.Module:
    """transformers' own class at its default attention with the encoder's weights, as a script loads it.

    The encoder's model carries towerflow's own kernels (packed varlen attention and a padded MLP on
    CUDA, a linear patch embedding): a baseline that ran them would credit the naive loop with them.
    """
    config = copy.deepcopy(enc.model.config)
    model = type(enc.model)._from_config(config, attn_implementation=None, dtype=enc.dtype)
    model.load_state_dict(enc.model.state_dict())
    return model.to(enc.device).eval()


def measure_naive(enc: encoders.Encoder, paths: list[Path]) -> float:
    """What most scripts do: open, processor, forward, one image at a time, nothing overlapped."""
    model, processor = naive_model(enc), enc.processor
    t0 = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        inputs = processor(images=[image], return_tensors="pt")
        pixels = inputs["pixel_values"].to(enc.device, enc.dtype)
        with torch.inference_mode():
            if "image_grid_thw" in inputs:  # variable-resolution towers take the patch grid
                model(pixels, grid_thw=inputs["image_grid_thw"].to(enc.device))
            else:
                model(pixel_values=pixels)
    _sync(enc.device)
    return len(paths) / (time.perf_counter() - t0)


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for frag, peak in PEAKS if frag in name), None)


@dataclass
class MemorySampler:
    """Peak memory of this process and of the Ray worker processes, sampled in a thread.

    Summed RSS counts every shared page (the object store's shared memory, torch's and Python's
    libraries) once per process that maps it; summed PSS splits shared pages among their sharers, so
    it is the memory the workers really hold together. Both are reported. RSS (statm: cheap) is read
    every `interval`, PSS (smaps_rollup: the kernel walks every mapping of a 1-2 GB process) only every
    `pss_every` samples: reading every worker's smaps took 23% of a core at 0.2 s and 8% at 1 s
    (measured), CPU the run being measured then lacks.
    """

    interval: float = 1.0
    pss_every: int = 10
    driver_peak: int = 0
    workers_peak_total: int = 0
    workers_pss_peak_total: int = 0
    worker_peak: int = 0
    gpu_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.driver_peak = max(self.driver_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    @staticmethod
    def _ray_workers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            title = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
            if title.startswith("ray::"):
                found.append(proc)
        return found

    def _run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            total = pss = 0
            for proc in self._ray_workers():  # Ray starts and retires workers during a run
                try:
                    if tick % self.pss_every == 0:
                        mem = proc.memory_full_info()
                        pss += getattr(mem, "pss", mem.rss)  # PSS exists on Linux only
                    else:
                        mem = proc.memory_info()
                    total += mem.rss
                    self.worker_peak = max(self.worker_peak, mem.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.workers_peak_total = max(self.workers_peak_total, total)
            self.workers_pss_peak_total = max(self.workers_pss_peak_total, pss)
            if torch.cuda.is_available():
                self.gpu_peak = max(self.gpu_peak, torch.cuda.max_memory_allocated())
            tick += 1
            self._stop.wait(self.interval)
