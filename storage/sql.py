"""DuckDB over the lake: one view per dataset, committed files only, hive partitions on.

Every Parquet file under a dataset directory is committed (see storage.lake), so views glob them.
Remote lakes are read through the lake's own fsspec filesystem (DuckDB's httpfs is not needed).
"""

from __future__ import annotations

import duckdb

from storage.lake import Lake

# view name -> (directory under LAKE, file pattern below it)
DATASETS = {
    "embeddings": ("embeddings", "**/*.parquet"),
    "patches": ("patches", "**/*.parquet"),
    "errors": ("errors", "**/*.parquet"),
    "clusters": ("clusters", "**/assignments.parquet"),
    "centroids": ("clusters", "**/centroids.parquet"),
    "duplicates": ("duplicates", "**/groups.parquet"),
    "exact_duplicates": ("duplicates", "**/exact.parquet"),
}


def connect(lake: Lake, extension_directory: str | None = None) -> duckdb.DuckDBPyConnection:
    """DuckDB with views embeddings, patches, errors, clusters, centroids, duplicates, exact_duplicates.

    Only views whose files exist are created.
    """
    con = duckdb.connect()
    if extension_directory:
        con.execute("SET extension_directory = ?", [extension_directory])
    if not lake.is_local:
        con.register_filesystem(lake.fs)
    for name, (directory, pattern) in DATASETS.items():
        suffix = pattern.rsplit("/", 1)[-1].removeprefix("*")
        if lake.list_files(directory, suffix=suffix):
            glob = lake.uri(f"{directory}/{pattern}").replace("'", "''")
            con.execute(
                f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{glob}', hive_partitioning=true, "
                "union_by_name=true)"
            )
    return con


def views(con: duckdb.DuckDBPyConnection) -> list[str]:
    return sorted(
        r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    )
