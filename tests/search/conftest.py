"""A small searchable lake built without the embed flow: real encoder vectors, real commit and LanceDB.

Eight PNG files of four sizes, embedded with the tiny qwen2_5_vl checkpoint; the first four committed
as dataset 'a', the rest as 'b', plus three error rows and a succeeded run manifest that records the
weights (what `towerflow search` reloads).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from _support import smooth_image

import encoders
from flows.cli_embed import UsageError
from flows.cli_search import add_parsers
from storage.commit import Committer, stage_shard
from storage.lake import Lake, new_run_id
from storage.manifest import EncoderRecord, RunManifest, write_manifest
from storage.schema import ERRORS_SCHEMA, embeddings_schema, vector_type
from storage.vectors import VectorTable

MODEL = "qwen2_5_vl"
SIZES = [(64, 96), (80, 80), (120, 72), (96, 160)]  # (height, width)
NOW = datetime(2026, 11, 27, tzinfo=timezone.utc)


@dataclass
class SearchLake:
    root: str  # local path or s3:// URL
    weights: Path
    paths: list[Path]
    ids: list[str]
    datasets: list[str]
    widths: list[int]
    vectors: np.ndarray  # (N, D) as stored
    revision: str

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


def _embedding_rows(enc, paths: list[Path], run_id: str) -> pa.Table:
    out = enc.embed([str(p) for p in paths], patches=False)
    data = [p.read_bytes() for p in paths]
    n = len(paths)
    return pa.table(
        {
            "image_id": [hashlib.sha256(d).hexdigest() for d in data],
            "uri": [str(p) for p in paths],
            "size_bytes": [len(d) for d in data],
            "source_version": ["2026-11-27T00:00:00Z"] * n,
            "width": pa.array([w for w, _ in out.sizes], pa.int32()),
            "height": pa.array([h for _, h in out.sizes], pa.int32()),
            "grid_h": pa.array([g[0] for g in out.grids], pa.int32()),
            "grid_w": pa.array([g[1] for g in out.grids], pa.int32()),
            "model_revision": [enc.revision] * n,
            "preprocess": [enc.preprocess_hash] * n,
            "dtype": ["float32"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(out.pooled.reshape(-1)), enc.dim).cast(
                vector_type(enc.dim)
            ),
            "run_id": [run_id] * n,
            "created_at": pa.array([NOW] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=embeddings_schema(enc.dim),
    )


def _error_rows(run_id: str) -> pa.Table:
    rows = [("broken1.jpg", "decode", "truncated"), ("broken2.jpg", "decode", "truncated"),
            ("gone.png", "read", "FileNotFoundError")]  # fmt: skip
    return pa.Table.from_pylist(
        [{"uri": u, "size_bytes": 10, "source_version": "v1", "model": None, "stage": s, "error_type": t,
          "message": f"{t}: {u}", "run_id": run_id, "created_at": NOW} for u, s, t in rows],
        schema=ERRORS_SCHEMA,
    )  # fmt: skip


def build_lake(root: str, corpus: Path, weights: Path, storage_options: dict | None = None) -> SearchLake:
    corpus.mkdir(parents=True)
    paths = []
    for i in range(8):
        h, w = SIZES[i % 4]
        path = corpus / f"img{i:02d}.png"
        smooth_image(h, w, seed=100 + i).save(path)
        paths.append(path)
    enc = encoders.load(MODEL, str(weights))
    lake = Lake(str(root), storage_options or {})
    tables = {name: VectorTable.open(str(root), name, enc.dim, storage_options) for name in (MODEL,)}

    def merge(model: str, dataset: str, rows: pa.Table) -> None:
        tables[model].merge(rows.append_column("dataset", pa.array([dataset] * rows.num_rows, pa.string())))

    run_id = new_run_id()
    committer = Committer(lake, merge)
    rows = {}
    for shard, dataset in enumerate(("a", "b")):
        rows[dataset] = _embedding_rows(enc, paths[4 * shard : 4 * shard + 4], run_id)
        staged = {("embeddings", MODEL): rows[dataset]}
        if dataset == "a":
            staged[("errors", None)] = _error_rows(run_id)
        committer.commit(stage_shard(lake, run_id, f"{shard:05d}", dataset, staged))
    record = EncoderRecord(MODEL, enc.revision, enc.preprocess_hash, enc.processor_config(), enc.dim, "auto",
                           str(weights))  # fmt: skip
    manifest = RunManifest(run_id, str(corpus), "a", [record])
    manifest.finish("succeeded")
    write_manifest(lake, manifest)
    both = pa.concat_tables([rows["a"], rows["b"]])
    return SearchLake(
        root=root, weights=weights, paths=paths, ids=both["image_id"].to_pylist(),
        datasets=["a"] * 4 + ["b"] * 4, widths=both["width"].to_pylist(),
        vectors=np.asarray(both["embedding"].to_pylist(), dtype=np.float32), revision=enc.revision,
    )  # fmt: skip


@pytest.fixture(scope="session")
def search_lake(tmp_path_factory, checkpoint) -> SearchLake:
    base = tmp_path_factory.mktemp("search-lake")
    return build_lake(str(base / "lake"), base / "corpus", checkpoint(MODEL))


@pytest.fixture(scope="session")
def build_search_lake():
    """build_lake itself, for tests that need a lake of their own (another root, S3)."""
    return build_lake


def _wired() -> bool:
    """Whether flows/cli.py already has these subcommands (then tests go through its main)."""
    from flows import cli

    parser = cli.build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return bool(actions) and "search" in actions[0].choices


@pytest.fixture
def run_cli(capsys):
    """run_cli(*argv) -> (exit code, stdout, stderr), like the `towerflow` console script."""

    def run(*argv: str) -> tuple[int, str, str]:
        argv = [str(a) for a in argv]
        if _wired():
            from flows.cli import main

            rc = main(argv)
        else:
            parser = argparse.ArgumentParser(prog="towerflow")
            add_parsers(parser.add_subparsers(dest="command", required=True))
            args = parser.parse_args(argv)
            try:
                rc = args.func(args)
            except UsageError as e:
                print(f"towerflow: error: {e}", file=sys.stderr)
                rc = 2
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run
