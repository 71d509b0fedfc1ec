"""Streaming one model's pooled vectors out of the lake in bounded batches (DuckDB over committed files).

Clustering and other whole-lake passes read through this, so no caller ever holds every vector.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.lake import Lake, check_name
from storage.sql import connect, views


class VectorQueryError(ValueError):
    """A read that cannot be done as asked (no vectors, a bad --where): the message is one line."""


@dataclass(frozen=True)
class VectorSource:
    """What one clustering reads: the newest revision of MODEL among the rows matching WHERE."""

    model: str
    revision: str | None
    dim: int
    rows: int
    other_revisions: dict[str, int]  # revision -> rows left out (a lake holding several weights)


@dataclass
class VectorBatch:
    image_id: pa.Array
    uri: pa.Array
    vectors: np.ndarray  # (rows, dim) float32, a copy the consumer owns (and may normalise in place)

    def __len__(self) -> int:
        return len(self.vectors)


class LakeVectors:
    """Streams (image_id, uri, vector) batches of one model from the lake's embeddings view via DuckDB.

    `max_batch_rows` records the largest batch ever yielded: the bound on vectors held at once.
    """

    def __init__(
        self, lake: Lake, model: str, where: str | None, batch_size: int, source: VectorSource | None = None
    ):
        self.con = connect(lake)
        if "embeddings" not in views(self.con):
            raise VectorQueryError(f"the lake {lake.url} holds no embeddings")
        self.where, self.batch_size = where, batch_size
        self.params = {"model": check_name("model", model)}
        self.filter = "model = $model AND embedding IS NOT NULL" + (f" AND ({where})" if where else "")
        if where and len(self._statements(where)) != 1:
            raise VectorQueryError(f"--where must be one SQL expression, got {where!r}")
        self.max_batch_rows = 0
        self.source = source or self._describe(model)

    def _statements(self, where: str) -> list:
        try:
            return self.con.extract_statements(f"SELECT 1 FROM embeddings WHERE ({where})")
        except duckdb.Error as e:
            raise VectorQueryError(f"--where {where!r}: {_first_line(e)}") from None

    def _error(self, e: Exception) -> VectorQueryError:
        what = f"--where {self.where!r}" if self.where else f"embeddings of {self.params['model']!r}"
        return VectorQueryError(f"{what}: {_first_line(e)}")

    def _rows(self, sql: str) -> list[tuple]:
        try:
            return self.con.sql(sql, params=self.params).fetchall()
        except duckdb.Error as e:
            raise self._error(e) from None

    def _describe(self, model: str) -> VectorSource:
        revisions = self._rows(
            f"SELECT model_revision, count(*) FROM embeddings WHERE {self.filter} "
            "GROUP BY model_revision ORDER BY max(created_at) DESC, model_revision"
        )
        if not revisions:
            where = f" matching --where {self.where!r}" if self.where else ""
            raise VectorQueryError(f"no embeddings of model {model!r}{where} in the lake")
        revision, rows = revisions[0]
        self.params["revision"] = revision
        ((dim,),) = self._rows(self._query("len(embedding)") + " LIMIT 1")
        others = {str(r): int(n) for r, n in revisions[1:]}
        return VectorSource(model, revision, int(dim), int(rows), others)

    def _query(self, columns: str) -> str:
        revision = "model_revision IS NOT DISTINCT FROM $revision"
        return f"SELECT {columns} FROM embeddings WHERE {self.filter} AND {revision}"

    def batches(self) -> Iterator[VectorBatch]:
        """One pass over the vectors, in the same order every pass, at most batch_size rows per batch."""
        self.params["revision"] = self.source.revision
        dim = self.source.dim
        sql = self._query(f"image_id, uri, embedding::FLOAT[{dim}] AS vector")
        try:
            reader = self.con.sql(sql, params=self.params).to_arrow_reader(self.batch_size)
            for record in reader:
                for start in range(0, record.num_rows, self.batch_size):
                    part = record.slice(start, self.batch_size)
                    flat = part.column("vector").flatten().to_numpy(zero_copy_only=False)
                    vectors = np.array(flat, dtype=np.float32).reshape(part.num_rows, dim)
                    self.max_batch_rows = max(self.max_batch_rows, part.num_rows)
                    yield VectorBatch(_own(part.column("image_id")), _own(part.column("uri")), vectors)
        except (duckdb.Error, OSError) as e:  # e.g. a vector of another length (raised via Arrow's stream)
            raise self._error(e) from None


def _own(column: pa.Array) -> pa.Array:
    """A copy with its own buffers: an imported column may keep its whole record batch (vectors) alive."""
    return pc.take(column, pa.array(np.arange(len(column)))).cast(pa.string())


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
