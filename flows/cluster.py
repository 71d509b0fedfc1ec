"""cluster_lake: k-means over one model's vectors in the lake, as a Prefect flow.

describe -> fit (sample + k-means++ + streaming mini-batch passes) -> assign every vector -> write
LAKE/clusters/model=<m>/run=<id>/{assignments,centroids}.parquet -> montage.png + inertia.png -> artifacts.
Entry points: `towerflow cluster LAKE ...`, the deployment `flows/cluster.py:cluster_lake`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from storage.lake import new_run_id
from tasks.cluster import (
    ClusterConfig,
    assign_clusters,
    describe_vectors,
    draw_clusters,
    fit_kmeans,
    report_clusters,
    write_clusters,
)

DEFAULT_BATCH = 4096


@flow(name="cluster-lake", log_prints=True)
def cluster_lake(
    lake: str,
    model: str,
    k: int,
    seed: int = 0,
    where: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    storage_options: dict[str, Any] | None = None,
    max_iter: int = 20,
    sample_size: int = 16_384,
    normalize: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Cluster the pooled vectors of MODEL (rows matching WHERE, SQL over the embeddings view) into k groups.

    storage_options: fsspec options such as endpoint_url; never credentials (Prefect stores parameters).
    Returns the run summary (sizes, inertia per pass, silhouette, output URIs).
    """
    cfg = ClusterConfig(
        lake=lake, model=model, k=k, seed=seed, where=where, batch_size=batch_size, max_iter=max_iter,
        sample_size=sample_size, normalize=normalize, device=device,
        storage_options=dict(storage_options or {}),
    )  # fmt: skip
    run_id = new_run_id()
    source = describe_vectors(cfg)
    km = fit_kmeans(cfg, source)
    result = assign_clusters(cfg, source, km)
    summary = write_clusters(cfg, result, run_id)
    draw_clusters(cfg, result, run_id)
    print(f"k-means {run_id}: {source.rows} vectors of {model}, k={k}, sizes {result.sizes[:12]}")
    return report_clusters(summary)
