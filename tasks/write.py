"""Write one Ray batch as a staged shard (embeddings + patches per model, errors) under the run's prefix.

Shard ids are random: a retried Ray task writes a new staged shard and the committer drops the rows
it already committed, so at-least-once delivery still commits each input once.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.commit import stage_shard
from storage.lake import Lake
from storage.schema import ERRORS_SCHEMA, embeddings_schema, patches_schema, vector_type
from tasks.decode import err_col
from tasks.embed import emb_col, grid_col, tok_col

PATCH_DTYPES = {"fp16": (np.float16, pa.float16()), "fp32": (np.float32, pa.float32())}


def _error_rows(batch: pa.Table, models: list[str], run_id: str, now: datetime) -> pa.Table:
    rows = []
    base = batch.select(["uri", "size_bytes", "source_version", "error"]).to_pylist()
    per_model = {m: batch[err_col(m)].to_pylist() for m in models}
    for i, row in enumerate(base):
        failures = [(None, row["error"])] + [(m, per_model[m][i]) for m in models]
        for model, error in failures:
            if error:
                e = json.loads(error)
                rows.append({"uri": row["uri"], "size_bytes": row["size_bytes"],
                             "source_version": row["source_version"], "model": model, "stage": e["stage"],
                             "error_type": e["type"], "message": e["message"], "run_id": run_id,
                             "created_at": now})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def _model_rows(batch: pa.Table, model: str, info: dict[str, Any], run_id: str, now: datetime) -> pa.Table:
    ok = batch.filter(batch[emb_col(model)].is_valid())
    n, grids = ok.num_rows, ok[grid_col(model)].to_pylist()
    return pa.table(
        {
            "image_id": ok["image_id"],
            "uri": ok["uri"],
            "size_bytes": ok["size_bytes"],
            "source_version": ok["source_version"],
            "width": ok["width"],
            "height": ok["height"],
            "grid_h": pa.array([g[0] for g in grids], pa.int32()),
            "grid_w": pa.array([g[1] for g in grids], pa.int32()),
            "model_revision": [info["revision"]] * n,
            "preprocess": [info["preprocess"]] * n,
            "dtype": [info["dtype"]] * n,
            "embedding": ok[emb_col(model)].combine_chunks().cast(vector_type(info["dim"])),
            "run_id": [run_id] * n,
            "created_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=embeddings_schema(info["dim"]),
    )


def _patch_rows(batch: pa.Table, model: str, info: dict[str, Any], run_id: str, patch_dtype: str) -> pa.Table:
    ok = batch.filter(batch[tok_col(model)].is_valid())
    np_dtype, pa_dtype = PATCH_DTYPES[patch_dtype]
    grids = ok[grid_col(model)].to_pylist()
    dim = info["patch_dim"]
    tokens = [np.frombuffer(b, dtype=np_dtype).reshape(-1, dim) for b in ok[tok_col(model)].to_pylist()]
    schema = patches_schema(dim, pa_dtype)
    token_type = schema.field("tokens").type
    flat = pa.array(np.concatenate(tokens).reshape(-1) if tokens else np.empty(0, np_dtype), pa_dtype)
    inner = pa.FixedSizeListArray.from_arrays(flat, type=token_type.value_type)
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int32))
    return pa.table(
        {
            "image_id": ok["image_id"],
            "model_revision": [info["revision"]] * ok.num_rows,
            "grid_h": pa.array([g[0] for g in grids], pa.int32()),
            "grid_w": pa.array([g[1] for g in grids], pa.int32()),
            "tokens": pa.ListArray.from_arrays(offsets, inner, type=token_type),
            "run_id": [run_id] * ok.num_rows,
        },
        schema=schema,
    )


def write_batch(
    batch: pa.Table,
    *,
    lake: str,
    lake_options: dict | None,
    run_id: str,
    dataset: str,
    infos: dict[str, dict[str, Any]],
    patches: bool,
    patch_dtype: str = "fp16",
) -> pa.Table:
    """infos: per model {"revision", "preprocess", "dtype", "dim", "patch_dim"}. Returns one summary row."""
    t0 = time.perf_counter()
    now = datetime.now(timezone.utc)
    store = Lake(lake, lake_options or {})
    models = list(infos)
    tables: dict[tuple[str, str | None], pa.Table] = {
        ("errors", None): _error_rows(batch, models, run_id, now)
    }
    for m in models:
        tables[("embeddings", m)] = _model_rows(batch, m, infos[m], run_id, now)
        if patches:
            tables[("patches", m)] = _patch_rows(batch, m, infos[m], run_id, patch_dtype)
    shard = secrets.token_hex(6)
    staged = stage_shard(store, run_id, shard, dataset, tables)
    seconds = {c.removeprefix("t__"): float(pc.sum(batch[c]).as_py() or 0.0) for c in batch.column_names
               if c.startswith("t__")}  # fmt: skip
    seconds["write"] = time.perf_counter() - t0
    spans = [c for c in batch.column_names if c.startswith("span_")]
    span = (
        [min(pc.min(batch[c]).as_py() for c in spans if c.startswith("span_start")),
         max(pc.max(batch[c]).as_py() for c in spans if c.startswith("span_end"))]
        if spans and batch.num_rows else []
    )  # fmt: skip
    return pa.table(
        {
            "shard": [shard],
            "files": [json.dumps(staged.files)],
            "inputs": [batch.num_rows],
            "embedded": [json.dumps({m: tables[("embeddings", m)].num_rows for m in models})],
            "errors": [tables[("errors", None)].num_rows],
            "seconds": [json.dumps(seconds)],
            "span": [json.dumps(span)],
        }
    )
