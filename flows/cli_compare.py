"""`towerflow compare` (cosine matrix of a few images) and `towerflow tokens` (one image's token grid).

Interactive commands: every input is checked (and every image decoded) before a model loads, and a
mistake exits 2 with one line. The work itself lives in tasks/compare.py and tasks/heatmap.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flows.cli_embed import UsageError

POOLINGS = ("mean", "max", "cls")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("compare", help="cosine similarity matrix of images, drawn as a heatmap")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR", help="image files/URLs and/or directories")
    p.add_argument("--model", required=True, help="encoder name (see `towerflow models`)")
    p.add_argument("--weights", required=True, help="checkpoint dir/URL/hub id")
    p.add_argument("--out", required=True, type=Path, help="heatmap PNG; .npy and .csv are written beside it")
    p.add_argument("--pooling", choices=POOLINGS, help="pooled vector to compare (default: the model's)")
    _device_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tokens", help="an image's token grid as a heatmap, or the token count of a size")
    p.add_argument("target", metavar="IMAGE|WIDTHxHEIGHT", help="an image (or, with --count, a size)")
    p.add_argument("--model", required=True, help="encoder name (see `towerflow models`)")
    p.add_argument("--weights", help="checkpoint; optional with --count (then: the released preprocessing)")
    p.add_argument("--out", type=Path, help="output PNG (required unless --count)")
    p.add_argument("--mode", choices=("norm", "similarity"), help="per-token norm (default) or similarity")
    p.add_argument(
        "--token", metavar="ROW,COL", help="reference token of --mode similarity (default: centre)"
    )
    p.add_argument("--count", action="store_true", help="print the token count and grid of WIDTHxHEIGHT")
    _device_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_tokens)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")


def _encoder_class(name: str) -> Any:
    import encoders

    return encoders.get_encoder_class(name)  # UnknownEncoderError: one line, exit 2


def _png_out(path: Path) -> Path:
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {str(path)!r}")
    if path.exists() and path.is_dir():
        raise UsageError(f"--out {path} is a directory; name a .png file")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _usage(fn: Any, *args: Any) -> Any:
    """Run FN, turning the tasks' InputError into the CLI's UsageError (one line, exit 2)."""
    from tasks.compare import InputError

    try:
        return fn(*args)
    except InputError as e:
        raise UsageError(str(e)) from e


def _load(args: argparse.Namespace) -> Any:
    import encoders

    return encoders.load(args.model, args.weights, device=args.device, dtype=args.dtype)


def cmd_compare(args: argparse.Namespace) -> int:
    from tasks import compare
    from tasks.heatmap import similarity_heatmap

    cls = _encoder_class(args.model)
    if args.pooling == "cls" and not cls.has_cls:
        raise UsageError(f"{args.model} has no CLS token; use --pooling mean or max")
    out = _png_out(args.out)
    paths = _usage(compare.expand_inputs, args.inputs)
    if len(paths) < 2:
        raise UsageError(f"compare needs at least 2 images, got {len(paths)}")
    if len(paths) > compare.MAX_COMPARE:
        raise UsageError(
            f"{len(paths)} images; compare draws an N x N matrix of at most {compare.MAX_COMPARE} "
            "(use towerflow dedup or cluster on a lake for more)"
        )
    thumbs = _usage(compare.read_thumbnails, paths)  # every image decodes before the model loads
    enc = _load(args)
    pooling = args.pooling or cls.default_pooling
    matrix = compare.cosine_matrix(compare.embed_pooled(enc, paths, pooling))
    names = compare.display_names(paths)
    npy, csv_path = compare.write_matrix(out, names, matrix)
    title = f"cosine similarity, {args.model} ({pooling} pooling), {len(paths)} images"
    similarity_heatmap(matrix, thumbs, title).save(out)
    most, least = compare.extreme_pairs(matrix)
    if args.json:
        pair = lambda p: {"a": names[p.i], "b": names[p.j], "score": p.score}  # noqa: E731
        files = {"png": str(out), "npy": str(npy), "csv": str(csv_path)}
        print(
            json.dumps({"images": names, "most_similar": pair(most), "least_similar": pair(least), **files})
        )
        return 0
    print(f"compared {len(paths)} images with {args.model} ({pooling} pooling, revision {enc.revision})")
    width = max(len(names[p.i]) for p in (most, least))
    for label, p in (("most similar: ", most), ("least similar:", least)):
        print(f"{label} {names[p.i].ljust(width)}  <->  {names[p.j]}  {p.score:.4f}")
    print(f"wrote {out}, {npy}, {csv_path}")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    if args.count:
        return _tokens_count(args)
    from storage.images import ImageDecodeError, load_image
    from tasks import compare
    from tasks.heatmap import token_overlay

    _encoder_class(args.model)
    if args.weights is None:
        raise UsageError("tokens needs --weights to draw a token heatmap (only --count works without)")
    if args.out is None:
        raise UsageError("tokens needs --out PNG to draw a token heatmap (or --count for the count only)")
    out = _png_out(args.out)
    mode = args.mode or ("similarity" if args.token else "norm")
    if args.token and mode != "similarity":
        raise UsageError("--token picks the reference of --mode similarity; drop it or use --mode similarity")
    token = _usage(compare.parse_token, args.token) if args.token else None
    try:
        image = load_image(args.target)  # FileNotFoundError passes through: one line, exit 2
    except ImageDecodeError as e:
        raise UsageError(f"cannot read image {args.target}: {e.reason} ({e.message})") from e
    enc = _load(args)
    res = enc.embed([image], patches=True)
    grid = tuple(int(v) for v in res.grids[0])
    values = _usage(compare.token_values, res.patches[0], grid, mode, token)
    gh, gw = grid
    if mode == "similarity":
        token = token if token is not None else (gh // 2, gw // 2)
        what = f"cosine similarity to token {token[0]},{token[1]}"
    else:
        what = "L2 norm of each token"
    caption = f"{args.model}: {gh} x {gw} tokens (h x w), {what}"
    region = compare.token_region(enc, image.width, image.height)
    token_overlay(image, values, region, caption, mark=token).save(out)
    if args.json:
        summary = {"out": str(out), "grid": [gh, gw], "tokens": gh * gw, "mode": mode,
                   "token": list(token) if token else None, "min": float(values.min()),
                   "max": float(values.max())}  # fmt: skip
        print(json.dumps(summary))
        return 0
    print(f"wrote {out}: {gh} x {gw} tokens (h x w), {what}, range {values.min():.4g} .. {values.max():.4g}")
    return 0


def _tokens_count(args: argparse.Namespace) -> int:
    import encoders
    from tasks import compare

    _encoder_class(args.model)
    if args.out is not None or args.mode or args.token:
        raise UsageError("--count prints a count only; --out, --mode and --token do not apply")
    width, height = _usage(compare.parse_size, args.target)
    if args.weights is not None:
        pre, how = encoders.load_preprocessor(args.model, args.weights), "checkpoint"
    else:
        pre, how = _usage(compare.default_preprocessor, args.model), "released default"
    count = compare.count_tokens(pre, args.model, width, height, how)
    if args.json:
        print(json.dumps({**asdict(count), "merged": count.merge > 1}))
        return 0
    print("\n".join(count.describe()))
    return 0
