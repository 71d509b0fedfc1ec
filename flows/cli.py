"""`towerflow`: the command-line front door to the flows.

Heavy imports (torch, transformers via `encoders`) happen after argument parsing, so `--help` and
usage errors are instant. A user mistake exits 2 with one `towerflow: error: ...` line; anything else
is a bug and raises with its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROG = "towerflow"


class CliError(Exception):
    """A user mistake the CLI detects itself (exit 2, one line)."""


def _int_at_least(minimum: int):
    """argparse type: an int >= MINIMUM (seeds must be >= 0 for numpy, image counts >= 1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _directory_arg(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise CliError(f"{path} exists and is not a directory")
    return path


def _first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def describe(name: str) -> dict[str, Any]:
    """What the registry knows about NAME without loading any weights (dims depend on the weights)."""
    import encoders

    cls = encoders.get_encoder_class(name)
    if hasattr(cls, "model_class"):  # one transformers tower
        model, processor = cls.model_class.__name__, cls.processor_class.__name__
    else:  # a composite (dual) names the towers it combines
        parts = getattr(sys.modules[cls.__module__], "PARTS", ())
        model, processor = " + ".join(parts) or "-", "(per tower)"
    doc = _first_line(cls.__doc__) or _first_line(sys.modules[cls.__module__].__doc__)
    return {
        "name": name,
        "default_pooling": cls.default_pooling,
        "has_cls": bool(cls.has_cls),
        "model_class": model,
        "processor_class": processor,
        "description": doc,
    }


def cmd_models(args: argparse.Namespace) -> int:
    import encoders

    rows = [describe(name) for name in encoders.available()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    keys = ["name", "default_pooling", "has_cls", "model_class", "processor_class", "description"]
    table = [["name", "pooling", "cls", "model class", "processor class", "description"]]
    table += [[("yes" if r[k] else "no") if k == "has_cls" else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(keys))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    if not root.is_dir():
        return {}
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    import encoders

    encoders.get_encoder_class(args.name)  # unknown name fails before anything is written
    directory = _directory_arg(args.dir)
    before = _snapshot(directory)
    encoders.make_checkpoint(args.name, directory, layout=args.layout, seed=args.seed)
    written = sorted(p for p, stamp in _snapshot(directory).items() if before.get(p) != stamp)
    total = sum(p.stat().st_size for p in written)
    what = f"a tiny {args.name} checkpoint (layout {args.layout}, seed {args.seed})"
    print(f"wrote {what} to {directory.resolve()}")
    width = max((len(str(p.relative_to(directory))) for p in written), default=0)
    for p in written:
        print(f"  {str(p.relative_to(directory)).ljust(width)}  {p.stat().st_size / 1024:9.1f} KB")
    print(f"total {total / 1024:.1f} KB in {len(written)} files")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=_directory_arg(args.out), images=args.images, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Turn image corpora into embeddings.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered encoders (no weights are loaded)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("make-checkpoint", help="write a tiny random-weight checkpoint of an encoder")
    p.add_argument("name", metavar="NAME", help="encoder name (see `towerflow models`)")
    p.add_argument("dir", metavar="DIR", type=Path, help="directory to write (created if missing)")
    layouts = "vision: towerflow's vision-only layout (default); vlm: a sharded full-VLM layout"
    p.add_argument("--layout", choices=("vision", "vlm"), default="vision", help=layouts)
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed of the weights (default 0)")
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("demo", help="the main job on a generated corpus, then SQL and nearest neighbours")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default ./demo-out)")
    p.add_argument("--images", type=_int_at_least(1), default=300, help="number of images (default 300)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="corpus and weights seed (default 0)")
    p.set_defaults(func=cmd_demo)

    from flows import cli_bench, cli_cluster, cli_compare, cli_search
    from flows.cli_embed import add_embed_parser

    add_embed_parser(sub)
    cli_search.add_parsers(sub)
    cli_compare.add_parsers(sub)
    cli_cluster.add_parsers(sub)
    cli_bench.add_parsers(sub)
    return parser


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def _chain(e: BaseException | None) -> list[BaseException]:
    """E and the exceptions it was raised from (explicitly, or implicitly unless suppressed)."""
    out: list[BaseException] = []
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return out


# How storage.lake.AccessDenied prints; Ray ships a worker's exception to the driver as text inside a
# UserCodeException, so this is how a denied write in a Ray worker is recognised and named.
_DENIED_TEXT = re.compile(r"AccessDenied: \[Errno \d+\] ([^\n]*?): '([^'\n]+)'")


def _one_line(e: BaseException) -> str:
    """One line for the user, secrets masked. An access denial names the URL it was denied (a wrapper
    raised from it may not)."""
    from storage.lake import DENIED, is_access_denied

    outer = e
    while isinstance(getattr(e, "cause", None), BaseException) and e.cause is not e:
        e = e.cause  # ray.exceptions.RayTaskError: its own str() is the worker's whole traceback
    denied = is_access_denied(outer)
    if denied:
        e = next((x for x in _chain(e) if isinstance(x, OSError) and x.filename is not None), e)
    found = _DENIED_TEXT.search(str(outer)) if denied else None
    if isinstance(e, OSError) and e.filename is not None:
        line = f"{e.strerror or type(e).__name__}: {os.fspath(e.filename)}"
    elif found:
        line = f"{found[1]}: {found[2]}"
    else:
        line = " ".join(str(e).split()) or type(e).__name__
        if denied and "access denied" not in line.lower():
            line = f"{DENIED}: {line}"  # e.g. s3fs's bare "Forbidden" from a HEAD request
    secrets = {os.environ.get(k) or "" for k in _SECRET_ENV}
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        line = line.replace(secret, "***")
    return line


class _NoTracebackWhenDenied(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; an access denial or a busy lake is
    explained in one line by the CLI, so their records keep their message and lose the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from storage.lake import is_access_denied
        from storage.lock import LakeLockedError

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (is_access_denied(exc) or isinstance(exc, LakeLockedError)):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def _one_line_denials() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    flt = _NoTracebackWhenDenied()
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(flt)


def _quiet_prefect(args: argparse.Namespace) -> None:
    """Before prefect is imported: no telemetry from the temporary local API, and, for quiet runs
    and the demo, only warnings from Prefect's loggers."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.command == "demo" or getattr(args, "quiet", False):
        level = os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING").upper()
        if "prefect" in sys.modules:  # `python -m flows.embed` imported it first: its loggers are set up
            for name in ("prefect", "prefect.extra", "prefect.client", "prefect.infrastructure"):
                logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse prints usage + error, exits 2
    _quiet_prefect(args)
    import encoders
    from flows.cli_embed import UsageError

    expected = (
        CliError,
        UsageError,
        encoders.UnknownEncoderError,
        encoders.CheckpointError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
    )
    from storage.lake import is_access_denied

    try:
        with _one_line_denials():
            return args.func(args)
    except Exception as e:
        if not (isinstance(e, expected) or is_access_denied(e)):  # access denied: whatever client said it
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
