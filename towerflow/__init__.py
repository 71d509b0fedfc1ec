"""towerflow for notebooks: open a lake, query it with SQL, search it by image.

    import towerflow
    lake = towerflow.Lake("/data/lake")            # or "s3://bucket/lake", storage_options={...}
    lake.sql("SELECT model, dataset, count(*) FROM embeddings GROUP BY ALL")   # pyarrow.Table
    lake.search(query_image="cat.jpg", k=10, where="dataset = 'photos'")       # pyarrow.Table
    lake.search(image_id="3fa2...", k=10).to_pandas()
    towerflow.search("/data/lake", query_image="cat.jpg")                      # the same, one call

A thin layer over tasks.search and storage: the CLI (`towerflow search`, `towerflow sql`) runs the
same code. Embedding a corpus is `towerflow embed` or `flows.embed.embed_corpus`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from storage.lake import Lake as _Store
from storage.manifest import RunManifest, list_manifests
from tasks.search import SearchError, SearchRequest, SqlError, lake_models
from tasks.search import search as _search
from tasks.search import sql as _sql

__all__ = ["Lake", "RunManifest", "SearchError", "SqlError", "search"]


class Lake:
    """A lake opened for reading. Query encoders are loaded once and kept for later searches."""

    def __init__(
        self, lake: str, storage_options: dict | None = None, extension_directory: str | None = None
    ):
        self.store = _Store(str(lake), dict(storage_options or {}))
        self.extension_directory = extension_directory  # DuckDB's, if it must not be ~/.duckdb
        self._encoders: dict = {}

    def __repr__(self) -> str:  # never the storage options: they may hold credentials
        return f"towerflow.Lake({self.store.url!r})"

    @property
    def url(self) -> str:
        return self.store.url

    def models(self) -> list[str]:
        """Encoders with a vector table in this lake."""
        return lake_models(self.store)

    def runs(self) -> list[RunManifest]:
        """Every embed run of this lake (its run manifests), oldest first."""
        return list_manifests(self.store)

    def sql(self, query: str) -> pa.Table:
        """QUERY over the views embeddings, patches, errors, clusters, duplicates (committed data only)."""
        return _sql(self.store, query, self.extension_directory)

    def search(
        self,
        query_image: Any = None,
        *,
        image_id: str | None = None,
        k: int = 5,
        where: str | None = None,
        model: str | None = None,
        weights: str | None = None,
        exact: bool = False,
        max_pixels: int | None = None,
    ) -> pa.Table:
        """The k images nearest to QUERY_IMAGE (path, URL, bytes, PIL) or to a stored IMAGE_ID.

        Columns: rank, score (cosine similarity), image_id, uri, dataset, width, height. A query image
        is embedded with WEIGHTS (default: those the newest run of MODEL used), and only if they are the
        revision the table was built with; otherwise SearchError says why.
        """
        request = SearchRequest(
            query_image=query_image, image_id=image_id, model=model, weights=weights, k=k, where=where,
            exact=exact, max_pixels=max_pixels, storage_options=dict(self.store.storage_options),
        )  # fmt: skip
        return _search(self.store, request, encoder_cache=self._encoders).rows


def search(
    lake: str, query_image: Any = None, *, storage_options: dict | None = None, **options: Any
) -> pa.Table:
    """`Lake(lake, storage_options).search(query_image, **options)` in one call."""
    return Lake(lake, storage_options).search(query_image, **options)
