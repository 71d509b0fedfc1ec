"""`towerflow embed` and `towerflow runs`: argument checks up front, then the embed flow.

Every check a user can fail (unknown model, unreadable SOURCE, missing weights, LAKE not writable)
runs before any work starts, so a mistake costs a second, not a started cluster.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from typing import Any

LOCKED_EXIT = 75  # EX_TEMPFAIL: another run holds the lake; schedulers may retry later


class UsageError(Exception):
    """A bad argument found before work starts (exit 2, one line)."""


def _options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option expects KEY=VALUE, got {pair!r}")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def add_embed_parser(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed new or changed images of SOURCE into the lake LAKE")
    p.add_argument(
        "source", metavar="SOURCE", help="directory, glob, fsspec URL or manifest (.txt/.csv/.parquet)"
    )
    p.add_argument(
        "--out", required=True, metavar="LAKE", help="lake: local path or fsspec URL (s3://bucket/lake)"
    )
    p.add_argument(
        "--model", default="qwen2_5_vl", help="encoder name(s), comma-separated (default qwen2_5_vl)"
    )
    p.add_argument(
        "--weights", required=True, help="checkpoint dir/URL/hub id; several: W1,W2 or name=W pairs"
    )
    p.add_argument("--dataset", default="default", help="dataset name in the lake (default 'default')")
    actors_help = "embedding actors per model (default: one per GPU, else one per core, <= 8)"
    p.add_argument("--actors", type=int, help=actors_help)
    p.add_argument(
        "--gpus-per-actor", type=float, help="GPUs per actor, fractional allowed (default 1 on GPU)"
    )
    budget_help = "token budget of one packed forward (default: 16384 on GPU, 2048 on CPU)"
    p.add_argument("--batch-tokens", type=int, help=budget_help)
    p.add_argument("--batch-images", type=int, default=64, help="images per actor call and per shard")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--patches", action=argparse.BooleanOptionalAction, default=True, help="write patch tokens"
    )
    p.add_argument("--max-pixels", type=int, help="upper bound of pixels per image after resize (Qwen/GLM)")
    p.add_argument("--limit", type=int, help="embed at most N images (after skipping done ones)")
    p.add_argument(
        "--ray-address", help="join this Ray cluster ('auto' or ray://...); default: RAY_ADDRESS or local"
    )
    opt_help = "fsspec option for SOURCE and LAKE (e.g. endpoint_url=...); never credentials"
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=opt_help)
    p.add_argument(
        "--wait-lock", type=float, default=0.0, metavar="SECONDS",
        help="wait up to SECONDS while another run writes LAKE (default 0: refuse, exit 75)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true", dest="compile_blocks",
        help="torch.compile the tower's blocks (Qwen/GLM on CUDA: ~7 s warm-up, ~2x throughput)",
    )  # fmt: skip
    p.add_argument(
        "--buffer-mb", type=int, metavar="MB",
        help="object-store memory for images in flight (default: 1024 per GPU actor, 256 per CPU actor)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("runs", help="past runs of a lake, from its run manifests")
    p.add_argument("lake", metavar="LAKE")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)


def preflight(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """Fail fast, with one line, on what the user can fix."""
    import encoders
    from flows.embed import parse_models
    from storage.lake import Lake, check_name, denied_as
    from storage.sources import SourceError, source_filesystem

    check_name("dataset", args.dataset)
    for flag, value in (
        ("--actors", args.actors),
        ("--batch-tokens", args.batch_tokens),
        ("--batch-images", args.batch_images),
        ("--limit", args.limit),
        ("--wait-lock", args.wait_lock),
        ("--buffer-mb", args.buffer_mb),
    ):
        if value is not None and value < (0 if flag in ("--limit", "--wait-lock") else 1):
            raise UsageError(f"{flag} must be positive, got {value}")
    max_pixels = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    for spec in parse_models(args.model, args.weights, args.dtype, max_pixels):
        if args.compile_blocks and not hasattr(encoders.get_encoder_class(spec.name), "compile_blocks"):
            raise UsageError(f"--compile is offered for the packed towers (Qwen, GLM), not {spec.name}")
        encoders.load_preprocessor(spec.name, spec.weights, storage_options=options or None, **spec.options)
    try:
        fs, path = source_filesystem(args.source, options)
        with denied_as(args.source):
            missing = not any(c in path for c in "*?[") and not fs.exists(path)
        if missing:
            raise UsageError(f"SOURCE {args.source} does not exist")
    except SourceError as e:
        raise UsageError(str(e)) from None
    try:
        lake = Lake(args.out, options)
        probe = f"_probe/{secrets.token_hex(4)}"
        lake.write_bytes(probe, b"")
        lake.remove(probe)
    except OSError as e:
        raise UsageError(f"LAKE {args.out} is not writable: {e.strerror or type(e).__name__}") from None


def cmd_embed(args: argparse.Namespace) -> int:
    options = _options(args.storage_option)
    try:
        preflight(args, options)
    except ValueError as e:  # our own argument checks (names, model/weights pairing, dtype ...)
        raise UsageError(" ".join(str(e).split())) from None
    from flows.embed import embed_corpus
    from storage.lock import LakeLockedError

    try:
        summary = embed_corpus(
            source=args.source, out=args.out, model=args.model, weights=args.weights,
            dataset=args.dataset, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
            batch_tokens=args.batch_tokens, batch_images=args.batch_images,
            dtype=args.dtype, patches=args.patches, max_pixels=args.max_pixels, limit=args.limit,
            ray_address=args.ray_address, quiet=args.quiet, source_options=options, lake_options=options,
            wait_lock=args.wait_lock, compile_blocks=args.compile_blocks, buffer_mb=args.buffer_mb,
        )  # fmt: skip
    except LakeLockedError as e:  # not a usage error: the same command succeeds later (EX_TEMPFAIL)
        print(f"towerflow: error: {e}", file=sys.stderr)
        return LOCKED_EXIT
    except KeyboardInterrupt:
        print("interrupted: everything committed so far is in the lake; re-run the same command to resume")
        return 130
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    c = summary["counts"]
    print(f"run {summary['run_id']}: {summary['status']}  lake {summary['lake']}")
    print(f"  listed {c['listed']}  skipped (done) {c['skipped_done']}  embedded {c['embedded']}  "
          f"errors {c['errors']}  {summary['timings'].get('images_per_s', 0)} images/s")  # fmt: skip
    for reason, n in summary["errors_by_reason"].items():
        print(f"  error {reason}: {n}")
    for name, info in summary["index"].items():
        print(f"  lance table {name}: {info['rows']} rows, version {info['version']}, index {info['index']}")


def cmd_runs(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from storage.lake import Lake
    from storage.manifest import list_manifests

    runs = list_manifests(Lake(args.lake, _options(args.storage_option)))
    if args.json:
        print(json.dumps([asdict(r) for r in runs], indent=2))
        return 0
    for r in runs:
        models = ",".join(f"{e.name}@{e.revision[:8]}" for e in r.encoders)
        c = r.counts
        print(f"{r.run_id}  {r.status:<11} {r.dataset:<12} {models:<28} listed {c.get('listed', '-')}  "
              f"embedded {c.get('embedded', '-')}  errors {c.get('errors', '-')}  {r.source}")  # fmt: skip
    if not runs:
        print(f"no runs in {args.lake}")
    return 0
