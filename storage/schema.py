"""Row schemas of the lake: the contract downstream SQL and vector users rely on.

Partition columns (model, dataset) live in the path (hive style), never inside the files, so every
reader sees them once. Vectors are fixed-size lists: DuckDB casts them to FLOAT[D].
"""

from __future__ import annotations

import pyarrow as pa

ERROR_STAGES = ("list", "read", "decode", "embed", "write")
KINDS = ("embeddings", "patches", "errors")

# Identifies one input version: a changed file (size, mtime/etag) is a new input.
SOURCE_FIELDS = [
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("source_version", pa.string()),  # mtime (ISO 8601, UTC) or etag
]


def vector_type(dim: int, dtype: pa.DataType | None = None) -> pa.DataType:
    return pa.list_(pa.field("item", dtype or pa.float32(), nullable=False), dim)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),  # sha256 of the bytes, hex
            *SOURCE_FIELDS,
            pa.field("width", pa.int32()),  # after EXIF transpose
            pa.field("height", pa.int32()),
            pa.field("grid_h", pa.int32()),
            pa.field("grid_w", pa.int32()),
            pa.field("model_revision", pa.string()),
            pa.field("preprocess", pa.string()),
            pa.field("dtype", pa.string()),
            pa.field("embedding", vector_type(dim)),
            pa.field("run_id", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def patches_schema(dim: int, dtype: pa.DataType | None = None) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("model_revision", pa.string()),
            pa.field("grid_h", pa.int32()),
            pa.field("grid_w", pa.int32()),
            # token vectors, row-major over (grid_h, grid_w)
            pa.field("tokens", pa.list_(vector_type(dim, dtype or pa.float16()))),
            pa.field("run_id", pa.string()),
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [
        *SOURCE_FIELDS,
        pa.field("model", pa.string()),  # null when the failure is model-independent (list/read/decode)
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
