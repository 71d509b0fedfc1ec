"""`towerflow bench`: the benchmark flow from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

QUICK = {"images": 48, "size": "small", "batch_images": 16}


def _scale(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale expects N,N,..., got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--scale expects positive image counts, got {text!r}")
    return values


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure ceiling vs end to end vs naive loop, per-stage time, memory, MFU"
    )
    p.add_argument("--model", default="dinov2", help="encoder to measure (default dinov2)")
    size_help = "random-weight tower size: small (dinov2-small / a small Qwen), real (the released shape)"
    p.add_argument("--size", choices=("tiny", "small", "real"), default="small", help=size_help)
    p.add_argument("--images", type=int, default=200, help="corpus size (photo-like JPEGs, 300-1600 px)")
    p.add_argument("--scale", type=_scale, default=(), help="also run end to end at these N, e.g. 1000,4000")
    p.add_argument("--quick", action="store_true", help="48 images, no scaling: a smoke run under 2 minutes")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--actors", type=int, help="embedding actors (default: one per GPU, else per core, <= 8)")
    p.add_argument("--batch-tokens", type=int, help="default: 16384 on GPU, 2048 on CPU")
    p.add_argument("--batch-images", type=int, default=32)
    p.add_argument(
        "--max-pixels", type=int, help="Qwen/GLM: pixels per image after resize (e.g. 200704 = 448^2)"
    )
    p.add_argument("--out", default="bench-out", help="corpus, checkpoints, lakes and bench.json/bench.md")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from flows.bench import bench
    from flows.cli_embed import UsageError

    config = {
        "model": args.model, "size": args.size, "images": args.images, "scale": args.scale,
        "device": args.device, "dtype": args.dtype, "actors": args.actors, "batch_tokens": args.batch_tokens,
        "batch_images": args.batch_images, "max_pixels": args.max_pixels, "out": args.out,
    }  # fmt: skip
    if args.quick:
        config.update(QUICK, scale=())
    budget = config["batch_tokens"]
    if config["images"] < 2 or (budget is not None and budget < 1) or config["batch_images"] < 1:
        raise UsageError("--images must be >= 2 and batch sizes positive")
    import encoders

    encoders.get_encoder_class(config["model"])  # an unknown name fails before any work
    result = bench(config)
    print(json.dumps(result, indent=2, default=str) if args.json else result["markdown"])
    return 0
