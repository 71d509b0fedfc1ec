"""dedup_lake: near-duplicate groups (k-NN above a cosine threshold) and exact duplicates, as a Prefect flow.

k-NN of every image against the model's vector table -> union-find groups; same image_id under several
uris via DuckDB -> LAKE/duplicates/model=<m>/run=<id>/{groups,exact}.parquet + groups.png -> artifacts.
Entry points: `towerflow dedup LAKE ...`, the deployment `flows/dedup.py:dedup_lake`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from storage.lake import new_run_id
from tasks.dedup import (
    DedupConfig,
    find_exact_duplicates,
    find_near_duplicates,
    report_duplicates,
    write_duplicates,
)


@flow(name="dedup-lake", log_prints=True)
def dedup_lake(
    lake: str,
    model: str,
    threshold: float = 0.95,
    k: int = 10,
    where: str | None = None,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 1024,
    workers: int = 4,
) -> dict[str, Any]:
    """Group MODEL's images whose cosine similarity is at least THRESHOLD (k neighbours asked per image).

    where: a filter both LanceDB and DuckDB read (plain comparisons on dataset, uri, width, height, ...).
    storage_options: fsspec options such as endpoint_url; never credentials (Prefect stores parameters).
    """
    cfg = DedupConfig(
        lake=lake, model=model, threshold=threshold, k=k, where=where, batch_size=batch_size, workers=workers,
        storage_options=dict(storage_options or {}),
    )  # fmt: skip
    run_id = new_run_id()
    near = find_near_duplicates(cfg)
    exact = find_exact_duplicates(cfg)
    summary = write_duplicates(cfg, run_id, near, exact)
    print(f"dedup {run_id}: {summary['near_groups']} near-duplicate groups, {summary['exact_groups']} exact")
    return report_duplicates(summary, near, exact)
