"""The read side of the lake: similarity search over one encoder's LanceDB table, and SQL over its views.

A query image is embedded with the encoder that built the table, and only if its weights hash to a
revision the table holds: vectors of two revisions are not comparable, so anything else is refused
rather than answered wrongly. A query by image_id reuses the stored vector and needs no encoder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import encoders
from storage.images import ImageDecodeError
from storage.lake import Lake, check_name
from storage.manifest import list_manifests
from storage.sources import read_bytes
from storage.vectors import VECTOR_COLUMN, VectorTable, lance_storage_options, lance_uri
from tasks.grid import Tile, draw_sheet, load_thumbnail, save_png

RESULT_SCHEMA = pa.schema(
    [
        ("rank", pa.int32()),
        ("score", pa.float32()),  # cosine similarity = 1 - cosine distance
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("dataset", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


class SearchError(Exception):
    """A search that cannot be answered as asked: unknown model or id, wrong weights, bad filter."""


class SqlError(Exception):
    """A query DuckDB refused (syntax, unknown view or column), as one line."""


@dataclass(frozen=True)
class SearchRequest:
    query_image: Any = None  # path, fsspec URL, bytes, PIL image or uint8 array
    image_id: str | None = None  # or: an image already in the table (its stored vector is the query)
    model: str | None = None  # None: the lake's only model
    weights: str | None = None  # None: the weights recorded by the newest succeeded run of the model
    k: int = 5
    where: str | None = None  # LanceDB SQL prefilter, e.g. "dataset = 'x' AND width > 512"
    exact: bool = False  # bypass the ANN index
    max_pixels: int | None = None  # the run's --max-pixels, if it used one (Qwen / GLM)
    storage_options: dict = field(default_factory=dict, repr=False)  # for the query image and weights

    def __post_init__(self) -> None:
        if (self.query_image is None) == (self.image_id is None):
            raise SearchError("give exactly one of a query image or an image id")
        if self.k < 1:
            raise SearchError(f"k must be >= 1, got {self.k}")


@dataclass
class SearchResult:
    model: str
    revision: str
    query: dict[str, Any]  # kind ("image" | "image_id"), image_id, uri (what the query was)
    where: str | None  # the filter actually applied (a revision clause added where needed)
    rows: pa.Table  # RESULT_SCHEMA, best first
    notes: list[str] = field(default_factory=list)  # warnings worth a line on stderr

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "revision": self.revision,
            "query": self.query,
            "where": self.where,
            "results": self.rows.to_pylist(),
            "notes": self.notes,
        }


# -- the lake's vector tables --------------------------------------------------------------------------
def _connect(lake: Lake) -> lancedb.DBConnection:
    return lancedb.connect(
        lance_uri(lake.url),
        storage_options=lance_storage_options(lake.storage_options, lake.url) or None,
        read_consistency_interval=timedelta(0),
    )


def lake_models(lake: Lake) -> list[str]:
    """Encoders with a vector table in LAKE (never creates one)."""
    if not lake.exists("lance"):
        return []
    db, names, token = _connect(lake), [], None
    while True:  # list_tables pages its answer
        page = db.list_tables(page_token=token)
        names += page.tables
        token = page.page_token
        if not token:
            return sorted(names)


def pick_model(lake: Lake, model: str | None) -> str:
    if not lake.fs.exists(lake.base):
        raise SearchError(f"LAKE {lake.url} does not exist")
    models = lake_models(lake)
    if model is not None:
        check_name("model", model)
        if model not in models:
            listed = ", ".join(models) or "none"
            raise SearchError(f"model {model!r} has no vectors in {lake.url} (models there: {listed})")
        return model
    if not models:
        raise SearchError(f"{lake.url} holds no vector tables: embed a corpus into it first")
    if len(models) > 1:
        raise SearchError(f"{lake.url} holds several models ({', '.join(models)}): choose one with --model")
    return models[0]


def open_table(lake: Lake, model: str) -> VectorTable:
    """MODEL's table as it is (VectorTable.open would create a missing one)."""
    table = _connect(lake).open_table(model)
    return VectorTable(table, model, table.schema.field(VECTOR_COLUMN).type.list_size)


def table_revisions(table: VectorTable) -> list[str]:
    """The model revisions of the table's rows (usually one; more after a re-run with new weights)."""
    column = table.table.search().select(["model_revision"]).limit(None).to_arrow()["model_revision"]
    return sorted(r for r in pc.unique(column).to_pylist() if r)


# -- the query encoder ---------------------------------------------------------------------------------
def recorded_weights(lake: Lake, model: str) -> str | None:
    """Where the newest succeeded run of MODEL loaded its weights from."""
    for run in reversed(list_manifests(lake)):
        if run.status == "succeeded":
            for record in run.encoders:
                if record.name == model and record.weights:
                    return record.weights
    return None


def recorded_preprocess(lake: Lake, model: str, revision: str) -> str | None:
    for run in reversed(list_manifests(lake)):
        for record in run.encoders:
            if record.name == model and record.revision == revision:
                return record.preprocess
    return None


def load_encoder(
    model: str, weights: str, max_pixels: int | None = None, storage_options: dict | None = None
):
    """encoders.load with the failures a user can fix turned into SearchError."""
    options = {"max_pixels": max_pixels} if max_pixels else {}
    try:
        return encoders.load(model, weights, storage_options=storage_options or None, **options)
    except (OSError, encoders.CheckpointError, TypeError, ValueError) as e:
        raise SearchError(f"cannot load {model} weights from {weights}: {' '.join(str(e).split())}") from None


def query_encoder(lake: Lake, model: str, request: SearchRequest, revisions: list[str], cache: dict | None):
    """The encoder to embed the query with: --weights, else the run's recorded weights; same revision."""
    weights = request.weights or recorded_weights(lake, model)
    if not weights:
        raise SearchError(f"no weights recorded for {model} in {lake.url}'s runs: pass --weights")
    key = (model, weights, request.max_pixels)
    encoder = (cache or {}).get(key) or load_encoder(
        model, weights, request.max_pixels, request.storage_options
    )
    if cache is not None:
        cache[key] = encoder
    check_revision(encoder, model, revisions, weights)
    return encoder


def check_revision(encoder: Any, model: str, revisions: list[str], weights: str | None = None) -> None:
    if encoder.revision not in revisions:
        source = f"weights {weights}" if weights else "weights"
        raise SearchError(
            f"{model} {source} have revision {encoder.revision[:12]}, but the table was built with "
            f"{', '.join(r[:12] for r in revisions)}: pass the weights that built it (--weights)"
        )


def _query_bytes_id(image: Any, storage_options: dict) -> str | None:
    """sha256 of a file or bytes query (the image_id it would have in the lake); None for in-memory images."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).hexdigest()
    if isinstance(image, (str, os.PathLike)):
        return hashlib.sha256(read_bytes(os.fspath(image), storage_options)).hexdigest()
    return None


# -- search --------------------------------------------------------------------------------------------
def _and(*clauses: str | None) -> str | None:
    parts = [c for c in clauses if c]
    return " AND ".join(f"({c})" for c in parts) if len(parts) > 1 else (parts[0] if parts else None)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def result_rows(hits: pa.Table) -> pa.Table:
    """LanceDB hits (with _distance) -> RESULT_SCHEMA, ranked from 1."""
    score = pc.subtract(pa.scalar(1.0, pa.float32()), hits["_distance"].cast(pa.float32()))
    columns = {
        "rank": pa.array(np.arange(1, hits.num_rows + 1, dtype=np.int32)),
        "score": score,
        **{name: hits[name] for name in ("image_id", "uri", "dataset", "width", "height")},
    }
    return pa.table(columns, schema=RESULT_SCHEMA)


@dataclass
class _Query:
    vector: np.ndarray
    revision: str
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _stored_query(lake: Lake, table: VectorTable, image_id: str) -> _Query:
    stored = table.get([image_id])
    if stored.num_rows == 0:
        raise SearchError(f"image id {image_id} is not in the {table.name} table of {lake.url}")
    vector = np.asarray(stored[VECTOR_COLUMN][0].as_py(), dtype=np.float32)
    info = {"kind": "image_id", "image_id": image_id, "uri": stored["uri"][0].as_py()}
    return _Query(vector, stored["model_revision"][0].as_py(), info)


def _image_query(lake: Lake, model: str, request: SearchRequest, encoder: Any) -> _Query:
    notes = []
    expected = recorded_preprocess(lake, model, encoder.revision)
    if expected and expected != encoder.preprocess_hash:
        notes.append(
            f"the query's preprocessing differs from the run's ({encoder.preprocess_hash[:12]} vs "
            f"{expected[:12]}): pass the run's --max-pixels for identical vectors"
        )
    image, options = request.query_image, request.storage_options
    try:
        vector = encoder.embed([image], patches=False, storage_options=options).pooled[0]
    except FileNotFoundError as e:
        raise SearchError(f"query image not found: {e.filename or image}") from None
    except ImageDecodeError as e:
        raise SearchError(f"query image {image}: {e}") from None
    shown = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    info = {"kind": "image", "image_id": _query_bytes_id(image, options), "uri": shown}
    return _Query(np.asarray(vector, dtype=np.float32), encoder.revision, info, notes)


def search(
    lake: Lake, request: SearchRequest, encoder_cache: dict | None = None, encoder: Any = None
) -> SearchResult:
    """Search LAKE. `encoder`: an already loaded query encoder; `encoder_cache` keeps loaded ones."""
    model = pick_model(lake, request.model)
    table = open_table(lake, model)
    revisions = table_revisions(table)
    if not revisions:
        raise SearchError(f"the {model} table in {lake.url} is empty")
    if request.image_id is not None:
        query = _stored_query(lake, table, request.image_id)
    else:
        if encoder is None:
            encoder = query_encoder(lake, model, request, revisions, encoder_cache)
        check_revision(encoder, model, revisions, request.weights)
        query = _image_query(lake, model, request, encoder)
    # Vectors of two revisions are not comparable: search only the query's own.
    only = f"model_revision = {_quote(query.revision)}" if len(revisions) > 1 else None
    where = _and(only, request.where)
    try:
        hits = table.search(query.vector, k=request.k, where=where, exact=request.exact)
    except ValueError as e:
        raise SearchError(f"--where {request.where!r}: {' '.join(str(e).split())}") from None
    return SearchResult(model, query.revision, query.info, where, result_rows(hits), query.notes)


def result_sheet(result: SearchResult, query_image: Any = None, storage_options: dict | None = None):
    """Query tile (framed) then one tile per hit: rank and score, then the file name."""
    source = query_image if query_image is not None else result.query.get("uri")
    name = result.query.get("uri") or result.query.get("image_id") or "(in memory)"
    tiles = [Tile(load_thumbnail(source, storage_options=storage_options), ["query", str(name)], True)]
    for row in result.rows.to_pylist():
        caption = [f"#{row['rank']}  {row['score']:.4f}  {row['dataset'] or ''}".rstrip(), str(row["uri"])]
        tiles.append(Tile(load_thumbnail(row["uri"], storage_options=storage_options), caption))
    return draw_sheet(tiles)


def write_sheet(
    result: SearchResult, output_dir: str | os.PathLike, query_image: Any = None, storage_options=None
) -> Path:
    """OUTPUT_DIR/search-<UTC time>.png (a new file per search, so earlier sheets are kept)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return save_png(
        result_sheet(result, query_image, storage_options), Path(output_dir) / f"search-{stamp}.png"
    )


# -- SQL -----------------------------------------------------------------------------------------------
def sql(lake: Lake, query: str, extension_directory: str | None = None) -> pa.Table:
    """QUERY over the lake's DuckDB views (storage.sql.connect), as an Arrow table."""
    import duckdb

    from storage.sql import connect, views

    if not lake.fs.exists(lake.base):
        raise SqlError(f"LAKE {lake.url} does not exist")
    con = connect(lake, extension_directory)
    try:
        relation = con.sql(query)
        if relation is None:  # a statement without a result (SET, CREATE VIEW ...)
            return pa.table({})
        fetch = getattr(relation, "to_arrow_table", None) or relation.arrow  # duckdb 2 / 1.x
        return fetch()
    except duckdb.Error as e:
        first = " ".join(str(e).split("\n\n", 1)[0].split())
        raise SqlError(f"{first} (views in this lake: {', '.join(views(con)) or 'none'})") from None
    finally:
        con.close()
