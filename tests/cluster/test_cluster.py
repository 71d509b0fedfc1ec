"""k-means over the lake: recovers planted blobs, streams in bounded batches, writes what DuckDB reads."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from math import comb
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from flows.cli import main
from storage.commit import Committer, stage_shard
from storage.lake import Lake, new_run_id
from storage.schema import embeddings_schema
from storage.vector_stream import VectorQueryError
from tasks import montage
from tasks.cluster import (
    ClusterConfig,
    assign_all,
    cluster_pictures,
    fit,
    open_vectors,
    write_clusters,
)

MODEL, K, DIM, N = "tiny", 6, 32, 3000
NOW = datetime(2026, 11, 26, tzinfo=timezone.utc)
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def embedding_rows(vectors: np.ndarray, uris: list[str], revision: str = "rev1", created=NOW) -> pa.Table:
    n, dim = vectors.shape
    ids = [hashlib.sha256(u.encode()).hexdigest() for u in uris]
    return pa.table(
        {
            "image_id": ids, "uri": uris, "size_bytes": [100] * n, "source_version": ["v1"] * n,
            "width": [16] * n, "height": [16] * n, "grid_h": [1] * n, "grid_w": [1] * n,
            "model_revision": [revision] * n, "preprocess": ["pp"] * n, "dtype": ["float32"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "run_id": ["r0"] * n, "created_at": [created] * n,
        },
        schema=embeddings_schema(dim),
    )  # fmt: skip


def commit_rows(lake: Lake, dataset: str, shards: list[pa.Table]) -> None:
    """Rows enter the lake as the embed flow's do: staged, then committed (made visible) by the Committer."""
    run_id, committer = new_run_id(), Committer(lake)
    for i, table in enumerate(shards):
        committer.commit(stage_shard(lake, run_id, f"{i:05d}", dataset, {("embeddings", MODEL): table}))


def blobs(n: int, k: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian blobs: centres ~ N(0, 4^2) per axis, unit noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4.0
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, dim))).astype(np.float32), truth


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    pairs = sum(comb(int(x), 2) for x in table.ravel())
    rows, cols = (sum(comb(int(x), 2) for x in table.sum(axis)) for axis in (1, 0))
    expected = rows * cols / comb(len(a), 2)
    return (pairs - expected) / ((rows + cols) / 2 - expected)


@pytest.fixture(scope="module")
def blob_lake(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    """3,000 vectors of 6 blobs, datasets a (2,000) and b (1,000); each uri is a PNG of its blob's colour."""
    root = tmp_path_factory.mktemp("blobs")
    vectors, truth = blobs(N, K, DIM, seed=7)
    images = root / "images"
    images.mkdir()
    uris = []
    for i, t in enumerate(truth):
        path = images / f"{i:05d}.png"
        Image.new("RGB", (24, 16), COLOURS[t]).save(path)
        uris.append(str(path))
    lake = Lake(str(root / "lake"))
    shards = [embedding_rows(vectors[s : s + 1000], uris[s : s + 1000]) for s in range(0, N, 1000)]
    commit_rows(lake, "a", shards[:2])
    commit_rows(lake, "b", shards[2:])
    return lake.url, vectors, truth


def run(cfg: ClusterConfig):
    reader = open_vectors(cfg)
    result = assign_all(cfg, reader, fit(cfg, reader))
    return reader, result


def row_index(result) -> np.ndarray:
    return np.array([int(Path(u).stem) for u in result.assignments["uri"].to_pylist()])


def test_recovers_gaussian_blobs_deterministically(blob_lake):
    lake, vectors, truth = blob_lake
    cfg = ClusterConfig(lake=lake, model=MODEL, k=K, seed=3, batch_size=256)
    reader, result = run(cfg)
    idx = row_index(result)
    labels = result.assignments["cluster"].to_numpy()
    assert sorted(idx.tolist()) == list(range(N))
    assert adjusted_rand_index(truth[idx], labels) >= 0.9
    assert reader.max_batch_rows == 256
    assert sum(result.sizes) == N and result.sizes == sorted(result.sizes, reverse=True)
    assert np.bincount(labels, minlength=K).tolist() == result.sizes
    assert 1 <= len(result.history) <= cfg.max_iter and result.converged
    assert result.silhouette is not None and result.silhouette > 0.5
    # distance = Euclidean distance of the unit vector to its (renumbered) centroid, and inertia sums them
    unit = vectors[idx] / np.linalg.norm(vectors[idx], axis=1, keepdims=True)
    centroids = np.stack(result.centroids["centroid"].to_numpy(zero_copy_only=False))
    expected = np.linalg.norm(unit - centroids[labels], axis=1)
    np.testing.assert_allclose(result.assignments["distance"].to_numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(result.inertia, float((expected.astype(np.float64) ** 2).sum()), rtol=1e-4)
    # every vector sits with its nearest centroid
    nearest = np.linalg.norm(unit[:, None, :] - centroids[None], axis=2).argmin(1)
    assert (nearest == labels).mean() == 1.0

    _, again = run(cfg)
    assert again.assignments.equals(result.assignments) and again.centroids.equals(result.centroids)
    _, other_seed = run(ClusterConfig(lake=lake, model=MODEL, k=K, seed=11, batch_size=1000))
    assert (
        adjusted_rand_index(truth[row_index(other_seed)], other_seed.assignments["cluster"].to_numpy()) >= 0.9
    )


def test_where_filter_and_newest_revision_only(blob_lake, tmp_path):
    lake, _, truth = blob_lake
    _, result = run(ClusterConfig(lake=lake, model=MODEL, k=K, where="dataset = 'b'", batch_size=300))
    idx = row_index(result)
    assert sorted(idx.tolist()) == list(range(2000, 3000))
    assert adjusted_rand_index(truth[idx], result.assignments["cluster"].to_numpy()) >= 0.9

    # a lake re-embedded with new weights: only the newest revision is clustered, the rest reported
    mixed = Lake(str(tmp_path / "mixed"))
    vectors, _ = blobs(300, 3, 8, seed=1)
    commit_rows(mixed, "a", [embedding_rows(vectors, [f"/x/{i}.jpg" for i in range(300)], "new")])
    old = embedding_rows(vectors[:40], [f"/old/{i}.jpg" for i in range(40)], "old", NOW - timedelta(days=1))
    commit_rows(mixed, "a", [old])
    source = open_vectors(ClusterConfig(lake=mixed.url, model=MODEL, k=3)).source
    assert (source.revision, source.rows, source.dim, source.other_revisions) == ("new", 300, 8, {"old": 40})


def test_pictures_show_each_clusters_nearest_images(blob_lake, tmp_path):
    lake, _, _ = blob_lake
    cfg = ClusterConfig(lake=lake, model=MODEL, k=K, batch_size=512)
    _, result = run(cfg)
    pictures = cluster_pictures(cfg, result)
    grid = Image.open(io.BytesIO(pictures["montage.png"]))
    assert grid.size == montage.montage_size(K) == (montage.LABEL_W + 8 * (96 + 6) + 6, 30 + 6 * 116 + 6)
    row_colours = []
    for r in range(K):
        y = montage.HEADER + r * (montage.THUMB + montage.CAPTION + montage.PAD) + montage.THUMB // 2
        cells = {grid.getpixel((montage.LABEL_W + t * (montage.THUMB + montage.PAD) + montage.THUMB // 2, y))
                 for t in range(montage.MONTAGE_THUMBS)}  # fmt: skip
        assert len(cells) == 1, (
            f"row {r} mixes blobs: {cells}"
        )  # the nearest images all share the blob colour
        row_colours.append(cells.pop())
    assert sorted(row_colours) == sorted(COLOURS)  # one row per blob
    chart = Image.open(io.BytesIO(pictures["inertia.png"]))
    assert chart.size == montage.CHART_SIZE
    drawn = np.asarray(chart.convert("RGB")).reshape(-1, 3)
    assert (drawn == montage.LINE).all(1).sum() > 20  # the line and its markers are there

    summary = write_clusters.fn(cfg, result, "20261126T000000Z-abc123")
    con = duckdb.connect()
    glob = f"{lake}/clusters/**/assignments.parquet"
    rows = con.execute(
        f"SELECT model, run, cluster, count(*) FROM read_parquet('{glob}', hive_partitioning=true)"
        " GROUP BY ALL ORDER BY cluster"
    ).fetchall()
    assert [r[:3] for r in rows] == [(MODEL, "20261126T000000Z-abc123", c) for c in range(K)]
    assert [r[3] for r in rows] == result.sizes == summary["sizes"]
    centroid = f"{lake}/clusters/model={MODEL}/run=20261126T000000Z-abc123/centroids.parquet"
    norms = con.execute(f"SELECT size, list_dot_product(centroid::FLOAT[{DIM}], centroid::FLOAT[{DIM}]) "
                        f"FROM read_parquet('{centroid}') ORDER BY cluster").fetchall()  # fmt: skip
    assert [n for n, _ in norms] == result.sizes and all(0.8 < d <= 1.0 for _, d in norms)


# A fresh interpreter: pages an earlier test freed stay resident and could be reused unseen. A warm-up run
# on the small dataset loads what is imported lazily (torch ops, Arrow kernels) and warms DuckDB's
# allocator, so the measure is what one more clustering run needs in a process that has read before (a
# destroyed connection hands its pages back and a fresh one regrows them: ~2x the steady-state figure, and
# constant in N). Two DuckDB and torch threads keep the read-ahead the same on any machine.
MEASURE = """
import json, sys, tracemalloc
import numpy as np, torch
from tasks.cluster import ClusterConfig, assign_all, fit, open_vectors

def peak_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS restarts from the current RSS
    return peak_kb()

def reader_for(where):
    cfg = ClusterConfig(lake=sys.argv[1], model=sys.argv[2], k=8, batch_size=1000, where=where,
                        sample_size=2000, max_iter=2, silhouette_sample=500)
    reader = open_vectors(cfg)
    reader.con.execute("SET threads = 2")
    return cfg, reader

torch.set_num_threads(2)
warm_cfg, warm = reader_for("dataset = 'small'")  # kept open: its DuckDB allocator stays warm
assign_all(warm_cfg, warm, fit(warm_cfg, warm))
cfg, reader = reader_for(None)
out = {"before": reset_peak()}
tracemalloc.start()
km = fit(cfg, reader)
out["fit_rss"], out["fit_traced"] = (peak_kb() - out["before"]) * 1024, tracemalloc.get_traced_memory()[1]
result = assign_all(cfg, reader, km)
out["rss"], out["traced"] = (peak_kb() - out["before"]) * 1024, tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
out.update(rows_held=reader.max_batch_rows, clustered=sum(result.sizes))
before = reset_peak()  # the control: the same reader's batches all kept, as a naive implementation would
kept = np.concatenate([batch.vectors for batch in reader.batches()])
out["materialised_rss"] = (peak_kb() - before) * 1024
print(json.dumps(out))
"""


def test_memory_stays_bounded_when_vectors_exceed_the_batch(tmp_path):
    """200,000 x 512 floats = 410 MB of vectors, clustered 1,000 rows at a time, in a fresh interpreter.

    tracemalloc's peak counts numpy, where every batch lands (on CPU torch shares that memory). The peak RSS
    counts everything, DuckDB, Arrow and the allocators' slack included: the clustering proper (sample +
    passes) must grow it by under a third of the vectors, the whole step, which also keeps the narrow
    (image_id, uri, cluster, distance) columns, by under three quarters; keeping DuckDB's imported id
    columns instead of copies would pin every batch's vectors and exceed that. The control keeps every
    batch and must grow the RSS by at least the vectors' size: the meter sees materialisation.
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the peak RSS cannot be reset on this system")
    n, dim, shard = 200_000, 512, 5_000
    lake = Lake(str(tmp_path / "lake"))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, dim)).astype(np.float32)
    for s in range(0, n, shard):
        vectors = centres[rng.integers(0, 8, shard)] + rng.standard_normal((shard, dim), np.float32)
        rows = embedding_rows(vectors, [f"/img/{i}.jpg" for i in range(s, s + shard)])
        path = Lake.shard_path("embeddings", "small" if s < 10_000 else "rest", MODEL, "r0", f"{s:06d}")
        lake.write_parquet(path, rows)
    total = n * dim * 4
    try:
        argv = [sys.executable, "-c", MEASURE, lake.url, MODEL]
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300
        )
    finally:
        shutil.rmtree(tmp_path / "lake")
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.splitlines()[-1])
    assert m["rows_held"] == 1000 and m["clustered"] == n, m
    assert m["fit_traced"] < total / 20 and m["traced"] < total / 20, m
    assert m["fit_rss"] < total / 3 and m["rss"] < total * 3 / 4, m
    assert m["materialised_rss"] >= total, m


def _cli(argv: list[str]) -> int:
    return main(argv)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "1"], "--k must be at least 2, got 1"),
        (["--k", "7", "--where", "uri LIKE '%00001.png'"], "--k 7 is more than the 1 vectors to cluster"),
        (["--k", "3", "--where", "dataset = = 'a'"], "--where \"dataset = = 'a'\": Parser Error"),
        (["--k", "3", "--where", "datset = 'a'"], "--where \"datset = 'a'\": Binder Error"),
        (["--k", "3", "--where", "1=1); DROP VIEW embeddings; SELECT (1"], "must be one SQL expression"),
        (["--k", "3", "--batch-size", "0"], "--batch-size and --max-iter must be positive"),
        (["--k", "3", "--model", "../x"], "model '../x' is not allowed"),
        (["--k", "3", "--model", "other"], "no embeddings of model 'other' in the lake"),
        (["--k", "3", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    ],
)
def test_bad_requests_exit_2_with_one_line(blob_lake, capsys, extra, message):
    lake, _, _ = blob_lake
    argv = ["cluster", lake, "--model", MODEL, *extra]
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("towerflow: error: ") and message in err, err


def test_missing_lake_exits_2(tmp_path, capsys):
    assert _cli(["cluster", str(tmp_path / "nope"), "--model", MODEL, "--k", "3"]) == 2
    assert capsys.readouterr().err == f"towerflow: error: LAKE {tmp_path / 'nope'} does not exist\n"


def test_vectors_of_another_length_are_refused(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    commit_rows(lake, "a", [embedding_rows(np.ones((5, 4), np.float32), [f"/a/{i}" for i in range(5)])])
    commit_rows(lake, "b", [embedding_rows(np.ones((5, 6), np.float32), [f"/b/{i}" for i in range(5)])])
    reader = open_vectors(ClusterConfig(lake=lake.url, model=MODEL, k=2))
    with pytest.raises(
        VectorQueryError, match="embeddings of 'tiny': .*Cannot cast list with length 6 to array"
    ):
        list(reader.batches())


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_cluster_flow_through_the_cli(blob_lake, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    lake, _, _ = blob_lake
    assert _cli(["cluster", lake, "--model", MODEL, "--k", str(K), "--seed", "1", "--batch-size", "700"]) == 0
    out = capsys.readouterr().out
    run_line = next(line for line in out.splitlines() if line.startswith("cluster run "))
    run_id = run_line.split()[2].rstrip(":")
    assert f"{N} vectors of {MODEL}" in run_line and f"k={K}" in run_line
    sizes_line = next(line for line in out.splitlines() if line.strip().startswith("sizes "))
    sizes = [int(s.split(":")[1]) for s in sizes_line.split()[1:]]
    assert sum(sizes) == N and len(sizes) == K
    base = Path(lake) / "clusters" / f"model={MODEL}" / f"run={run_id}"
    for name, size in (("montage.png", montage.montage_size(K)), ("inertia.png", montage.CHART_SIZE)):
        assert [name, str(base / name)] in [line.split() for line in out.splitlines()]
        assert (base / name).stat().st_size > 1000 and Image.open(base / name).size == size
    assert {p.name for p in base.iterdir()} == {
        "assignments.parquet", "centroids.parquet", "montage.png", "inertia.png", "summary.json"
    }  # fmt: skip
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cluster-sizes"]))
        )
        report = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cluster-report"]))
        )
    assert found and report
    table = found[0].data if isinstance(found[0].data, list) else __import__("json").loads(found[0].data)
    assert [row["size"] for row in table] == sizes
    assert run_id in report[0].data and "silhouette" in report[0].data


def test_cluster_a_lake_on_s3(s3):
    bucket, options = s3
    lake = Lake(f"s3://{bucket}/lake", options)
    vectors, truth = blobs(600, 3, 16, seed=2)
    uris = [f"s3://{bucket}/img/{i:05d}.png" for i in range(600)]  # not there: thumbnails become placeholders
    commit_rows(
        lake, "a", [embedding_rows(vectors[:300], uris[:300]), embedding_rows(vectors[300:], uris[300:])]
    )
    cfg = ClusterConfig(lake=lake.url, model=MODEL, k=3, batch_size=128, storage_options=options)
    _, result = run(cfg)
    idx = np.array([int(u.rsplit("/", 1)[-1][:5]) for u in result.assignments["uri"].to_pylist()])
    assert sorted(idx.tolist()) == list(range(600))
    assert adjusted_rand_index(truth[idx], result.assignments["cluster"].to_numpy()) >= 0.9
    summary = write_clusters.fn(cfg, result, "20261126T000000Z-s3s3s3")
    rel = f"clusters/model={MODEL}/run=20261126T000000Z-s3s3s3"
    assert summary["outputs"]["assignments.parquet"] == f"s3://{bucket}/lake/{rel}/assignments.parquet"
    assert lake.read_parquet(f"{rel}/assignments.parquet").num_rows == 600
    assert lake.read_parquet(f"{rel}/centroids.parquet")["size"].to_pylist() == result.sizes
    grid = Image.open(io.BytesIO(cluster_pictures(cfg, result)["montage.png"]))
    assert grid.size == montage.montage_size(3)
    cell = (montage.LABEL_W + montage.THUMB // 2, montage.HEADER + montage.THUMB - 4)
    assert grid.getpixel(cell) == montage.PLACEHOLDER
