"""Builders of lake rows for storage tests (the embed flow builds the same rows from real encoders)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from storage.schema import ERRORS_SCHEMA, embeddings_schema, patches_schema

DIM = 8
NOW = datetime(2026, 11, 26, tzinfo=timezone.utc)


def image_id(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()


def size_of(uri: str) -> int:
    return 1000 + int(image_id(uri)[:4], 16)


def key(uri: str, version: str = "v1") -> str:
    """The committer's input key for a row built here."""
    return f"{uri}\x1f{size_of(uri)}\x1f{version}"


def vectors(uris: list[str], dim: int = DIM) -> np.ndarray:
    """Deterministic per uri, so the same input always carries the same vector."""
    out = np.stack([np.random.default_rng(int(image_id(u)[:8], 16)).normal(size=dim) for u in uris])
    return out.astype(np.float32)


def embeddings(uris: list[str], run_id: str, revision: str = "rev1", version: str = "v1") -> pa.Table:
    n, vec = len(uris), vectors(uris)
    schema = embeddings_schema(DIM)
    return pa.table(
        {
            "image_id": [image_id(u) for u in uris],
            "uri": uris,
            "size_bytes": [size_of(u) for u in uris],
            "source_version": [version] * n,
            "width": [64] * n,
            "height": [48] * n,
            "grid_h": [2] * n,
            "grid_w": [3] * n,
            "model_revision": [revision] * n,
            "preprocess": ["pp1"] * n,
            "dtype": ["float32"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), DIM),
            "run_id": [run_id] * n,
            "created_at": [NOW] * n,
        },
        schema=schema,
    )


def patches(uris: list[str], run_id: str, revision: str = "rev1") -> pa.Table:
    tokens = [np.full((6, DIM), i, dtype=np.float16) for i in range(len(uris))]
    token_type = patches_schema(DIM).field("tokens").type
    return pa.table(
        {
            "image_id": [image_id(u) for u in uris],
            "model_revision": [revision] * len(uris),
            "grid_h": [2] * len(uris),
            "grid_w": [3] * len(uris),
            "tokens": pa.array([t.tolist() for t in tokens], type=token_type),
            "run_id": [run_id] * len(uris),
        },
        schema=patches_schema(DIM),
    )


def errors(
    uris: list[str], run_id: str, stage: str = "decode", model: str | None = None, error_type: str = "corrupt"
) -> pa.Table:
    n = len(uris)
    return pa.table(
        {
            "uri": uris,
            "size_bytes": [7] * n,
            "source_version": ["v1"] * n,
            "model": [model] * n,
            "stage": [stage] * n,
            "error_type": [error_type] * n,
            "message": ["truncated: image file is truncated"] * n,
            "run_id": [run_id] * n,
            "created_at": [NOW] * n,
        },
        schema=ERRORS_SCHEMA,
    )
