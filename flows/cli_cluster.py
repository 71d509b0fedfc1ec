"""`towerflow cluster` and `towerflow dedup`: argument checks up front, then the flows.

Every mistake a user can make (no such lake or model, k larger than the corpus, a --where that does not
parse) is found before the flow starts and reported as one `towerflow: error: ...` line with exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PROG = "towerflow"


def add_parsers(sub: Any) -> None:
    lake_help = "lake: local path or fsspec URL (s3://bucket/lake)"
    opt_help = "fsspec option for LAKE (e.g. endpoint_url=...); never credentials"

    p = sub.add_parser("cluster", help="k-means over a model's pooled vectors (streamed; GPU when present)")
    p.add_argument("lake", metavar="LAKE", help=lake_help)
    p.add_argument("--model", required=True, help="encoder name whose vectors to cluster")
    p.add_argument("--k", type=int, required=True, help="number of clusters (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and k-means++ (default 0)")
    p.add_argument("--where", metavar="SQL", help="filter over the embeddings view, e.g. \"dataset = 'x'\"")
    p.add_argument("--batch-size", type=int, default=4096, help="vectors held at once (default 4096)")
    p.add_argument("--max-iter", type=int, default=20, help="streaming passes at most (default 20)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=opt_help)
    p.add_argument("--quiet", action="store_true", help="no Prefect progress logs")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser(
        "dedup", help="near-duplicate groups (k-NN above a cosine threshold) and exact duplicates"
    )
    p.add_argument("lake", metavar="LAKE", help=lake_help)
    p.add_argument("--model", required=True, help="encoder name whose vector table to search")
    p.add_argument(
        "--threshold", type=float, default=0.95, help="cosine similarity cut, in (0, 1] (default 0.95)"
    )
    p.add_argument("--k", type=int, default=10, help="neighbours asked per image (default 10)")
    p.add_argument(
        "--where", metavar="SQL", help="filter on dataset, uri, width, height, ... (LanceDB and DuckDB)"
    )
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=opt_help)
    p.add_argument("--quiet", action="store_true", help="no Prefect progress logs")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_dedup)


def _fail(e: BaseException) -> int:
    print(f"{PROG}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 2


def _lake_options(args: argparse.Namespace) -> dict[str, Any]:
    from flows.cli_embed import _options
    from storage.lake import Lake

    options = _options(args.storage_option)
    lake = Lake(args.lake, options)
    if not lake.fs.exists(lake.base):
        raise FileNotFoundError(f"LAKE {args.lake} does not exist")
    return options


def cmd_cluster(args: argparse.Namespace) -> int:
    from flows.cli_embed import UsageError
    from tasks.cluster import ClusterConfig, ClusterError, open_vectors

    try:
        options = _lake_options(args)
        cfg = ClusterConfig(lake=args.lake, model=args.model, k=args.k, seed=args.seed, where=args.where,
                            batch_size=args.batch_size, max_iter=args.max_iter, device=args.device,
                            storage_options=options)  # fmt: skip
        source = open_vectors(cfg).source
        if source.rows < cfg.k:
            raise ClusterError(f"--k {cfg.k} is more than the {source.rows} vectors to cluster")
    except (UsageError, ValueError, FileNotFoundError) as e:  # ClusterError and check_name's are ValueErrors
        return _fail(e)
    from flows.cluster import cluster_lake

    summary = cluster_lake(lake=args.lake, model=args.model, k=args.k, seed=args.seed, where=args.where,
                           batch_size=args.batch_size, storage_options=options, max_iter=args.max_iter,
                           device=args.device)  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    sil = summary["silhouette"]
    print(f"cluster run {summary['run_id']}: {summary['rows']} vectors of {summary['model']} "
          f"(revision {str(summary['revision'])[:12]}, dim {summary['dim']}), k={summary['k']}, "
          f"{summary['passes']} passes")  # fmt: skip
    sizes = "  ".join(f"{c}:{n}" for c, n in enumerate(summary["sizes"][:20]))
    more = f"  (+{len(summary['sizes']) - 20} more)" if len(summary["sizes"]) > 20 else ""
    print(f"  sizes {sizes}{more}")
    print(
        f"  inertia {summary['inertia']:.6g} ({summary['inertia'] / max(summary['rows'], 1):.4g} per vector)"
        f"  silhouette {'n/a' if sil is None else f'{sil:.3f}'} (sample of {summary['silhouette_sample']})"
    )
    for rev, n in summary["other_revisions"].items():
        print(f"  left out: {n} vectors of revision {rev[:12]} (pick one: --where \"model_revision = '…'\")")
    _print_outputs(summary["outputs"])
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from flows.cli_embed import UsageError
    from tasks.dedup import DedupConfig, check_where, open_table

    try:
        options = _lake_options(args)
        cfg = DedupConfig(lake=args.lake, model=args.model, threshold=args.threshold, k=args.k,
                          where=args.where, storage_options=options)  # fmt: skip
        open_table(cfg)
        check_where(cfg)
    except (UsageError, ValueError, FileNotFoundError) as e:
        return _fail(e)
    from flows.dedup import dedup_lake

    summary = dedup_lake(lake=args.lake, model=args.model, threshold=args.threshold, k=args.k,
                         where=args.where, storage_options=options)  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"dedup run {summary['run_id']}: {summary['images']} images of {summary['model']} searched "
          f"(k={summary['k']}, cosine >= {summary['threshold']})")  # fmt: skip
    sizes = ", ".join(map(str, summary["group_sizes"][:20])) or "-"
    print(
        f"  near-duplicate groups: {summary['near_groups']} ({summary['near_images']} images; sizes {sizes})"
    )
    print(f"  exact duplicates: {summary['exact_groups']} images under {summary['exact_rows']} uris")
    _print_outputs(summary["outputs"])
    return 0


def _print_outputs(outputs: dict[str, str]) -> None:
    width = max(len(name) for name in outputs)
    for name, uri in outputs.items():
        print(f"  {name.ljust(width)}  {uri}")
