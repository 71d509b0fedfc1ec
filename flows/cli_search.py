"""`towerflow search` and `towerflow sql`: the lake's read side from the command line.

search: one lake (`search LAKE ...`) or the one-shot form for a plain directory (`search --image-dir
DIR ...`), which embeds DIR into OUTPUT_DIR/lake with the embed flow once and reuses that lake later.
Every mistake a user can fix (unknown model or id, weights of another revision, a bad --where or SQL)
exits 2 with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Any

from flows.cli_embed import UsageError, _options

CELL_WIDTH = 60  # table output: longer cells (vectors, messages) are cut


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="images most similar to a query image or image id (LanceDB, SQL prefilter)",
        description="Search LAKE, or with --image-dir a lake built for DIR under --output-dir "
        "(embedded once with --model/--weights; --weights is required there: nothing is downloaded).",
    )
    p.add_argument("lake", nargs="?", metavar="LAKE", help="lake to search (omit with --image-dir)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query-image", metavar="PATH", help="image file or URL to search with")
    query.add_argument("--image-id", metavar="ID", help="an image already in the lake (its stored vector)")
    p.add_argument("--image-dir", metavar="DIR", type=Path, help="one-shot: build or reuse a lake for DIR")
    p.add_argument("--model", help="encoder (default: the lake's only one; qwen2_5_vl with --image-dir)")
    p.add_argument("--weights", help="query encoder weights (default: those the lake's newest run used)")
    p.add_argument("-k", type=_positive, default=5, help="number of results (default 5)")
    p.add_argument("--where", metavar="SQL", help="prefilter, e.g. \"dataset = 'x' AND width > 512\"")
    p.add_argument("--exact", action="store_true", help="exact search (bypass the ANN index)")
    p.add_argument("--max-pixels", type=_positive, help="the embed run's --max-pixels, if it used one")
    p.add_argument(
        "--output-dir", type=Path, default=Path("search_results"), help="PNG (and one-shot lake) directory"
    )
    p.add_argument("--build-index", action="store_true", help="one-shot: embed DIR again (new files only)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true", help="one-shot: no embedding progress")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "sql", help="DuckDB over the lake: views embeddings, patches, errors, clusters, duplicates"
    )
    p.add_argument("lake", metavar="LAKE")
    p.add_argument("query", metavar="SQL", help='one query, e.g. "SELECT count(*) FROM embeddings"')
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print CSV (lists as JSON arrays)")
    fmt.add_argument("--json", action="store_true", help="print a JSON array of row objects")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_sql)


# -- search --------------------------------------------------------------------------------------------
def _one_shot_lake(args: argparse.Namespace, encoder: Any, options: dict) -> tuple[str, dict | None]:
    """OUTPUT_DIR/lake for IMAGE_DIR: reused when a finished run of this encoder revision built it."""
    from storage.lake import Lake
    from storage.manifest import list_manifests

    source = str(args.image_dir.resolve())
    lake_dir = str((args.output_dir / "lake").resolve())
    runs = list_manifests(Lake(lake_dir))
    others = sorted({r.source for r in runs} - {source})
    if others:
        raise UsageError(f"{lake_dir} is the lake of {others[0]}, not {source}: choose another --output-dir")
    built = any(
        r.status == "succeeded"
        and any(e.name == args.model and e.revision == encoder.revision for e in r.encoders)
        for r in runs
    )
    if built and not args.build_index:
        return lake_dir, None
    from flows.embed import embed_corpus

    quiet = args.quiet or args.json
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = embed_corpus(
            source=source, out=lake_dir, model=args.model, weights=args.weights, max_pixels=args.max_pixels,
            quiet=quiet, source_options=options, lake_options={},
        )  # fmt: skip
    if summary["status"] != "succeeded":
        raise UsageError(f"embedding {source} did not finish ({summary['status']}); see the run above")
    return lake_dir, summary


def _weights_arg(weights: str | None) -> str | None:
    """A local weights path made absolute, so the run manifest stays usable from another directory."""
    if weights and "://" not in weights and Path(weights).exists():
        return str(Path(weights).resolve())
    return weights


def cmd_search(args: argparse.Namespace) -> int:
    from storage.lake import Lake
    from tasks.search import SearchError, SearchRequest, load_encoder, search, write_sheet

    options = _options(args.storage_option)
    if (args.lake is None) == (args.image_dir is None):
        raise UsageError("give a LAKE to search, or --image-dir DIR for the one-shot form (not both)")
    if args.query_image and "://" not in args.query_image and not Path(args.query_image).is_file():
        raise UsageError(f"query image {args.query_image} does not exist")
    args.weights = _weights_arg(args.weights)
    encoder, summary, lake_url = None, None, args.lake
    try:
        if args.image_dir is not None:
            if not args.image_dir.is_dir():
                raise UsageError(f"--image-dir {args.image_dir} is not a directory")
            if not args.weights:
                raise UsageError("--image-dir needs --weights (the encoder to embed DIR with)")
            args.model = args.model or "qwen2_5_vl"
            encoder = load_encoder(args.model, args.weights, args.max_pixels, options)
            lake_url, summary = _one_shot_lake(args, encoder, options)
            options_lake: dict = {}
        else:
            options_lake = options
        lake = Lake(lake_url, options_lake)
        request = SearchRequest(
            query_image=args.query_image, image_id=args.image_id, model=args.model, weights=args.weights,
            k=args.k, where=args.where, exact=args.exact, max_pixels=args.max_pixels, storage_options=options,
        )  # fmt: skip
        result = search(lake, request, encoder=encoder if args.query_image else None)
        png = write_sheet(result, args.output_dir, args.query_image, options)
    except (SearchError, ValueError) as e:  # ValueError: names check_name refuses
        raise UsageError(" ".join(str(e).split())) from None
    for note in result.notes:
        print(f"towerflow: note: {note}", file=sys.stderr)
    report(args, result, lake.url, png, summary)
    return 0


def report(args: argparse.Namespace, result: Any, lake_url: str, png: Path, summary: dict | None) -> None:
    """JSON (results, lake, png, and the embed run of a one-shot build) or the text table."""
    if args.json:
        out = {**result.to_dict(), "lake": lake_url, "png": str(png)}
        if summary is not None:
            out["embedded"] = {"run_id": summary["run_id"], "counts": summary["counts"]}
        print(json.dumps(out, indent=2, default=str))
        return
    if summary is not None:
        c = summary["counts"]
        print(f"built {lake_url}: run {summary['run_id']}, embedded {c['embedded']}, errors {c['errors']}")
    elif args.image_dir is not None:
        print(f"reusing {lake_url} (--build-index to embed new files of {args.image_dir})")
    print_results(result)
    print(f"grid: {png}")


def print_results(result: Any) -> None:
    q = result.query
    print(f"model {result.model}@{result.revision[:12]}  query {q['uri'] or q['image_id']}")
    if result.where:
        print(f"where {result.where}")
    rows = [["rank", "score", "dataset", "uri"]]
    rows += [
        [str(r["rank"]), f"{r['score']:.4f}", r["dataset"] or "", r["uri"]] for r in result.rows.to_pylist()
    ]
    _print_aligned(rows, right=(0, 1))
    if result.rows.num_rows == 0:
        print("no matches")


# -- sql -----------------------------------------------------------------------------------------------
def _cell(value: Any, width: int = CELL_WIDTH) -> str:
    if value is None:
        return "NULL"
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return value


def _print_aligned(rows: list[list[str]], right: tuple[int, ...] = ()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


def cmd_sql(args: argparse.Namespace) -> int:
    from storage.lake import Lake
    from tasks.search import SqlError, sql

    try:
        table = sql(Lake(args.lake, _options(args.storage_option)), args.query)
    except SqlError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print("[" + ",\n ".join(json.dumps(r, default=str) for r in table.to_pylist()) + "]")
        return 0
    rows = list(zip(*(column.to_pylist() for column in table.columns), strict=True))
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_csv_value(v) for v in row] for row in rows)
    elif table.num_columns:
        numeric = tuple(i for i, f in enumerate(table.schema) if _is_number(f.type))
        _print_aligned([table.column_names] + [[_cell(v) for v in row] for row in rows], right=numeric)
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return 0


def _is_number(type_: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)
