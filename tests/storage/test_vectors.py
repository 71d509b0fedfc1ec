"""LanceDB vector tables: upsert by image_id, index lifecycle, prefiltered search, ANN recall, S3."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from storage.vectors import (
    VECTOR_COLUMN,
    IndexPolicy,
    VectorTable,
    lance_storage_options,
    lance_uri,
    vector_table_schema,
)

DIM = 16
TIMESTAMP = pa.timestamp("us", "UTC")
SMALL = IndexPolicy(min_rows=1000)  # the default policy's behaviour, at a size unit tests can afford
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
           "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")  # fmt: skip


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_rows(ids, vectors, dataset="a", run_id="r1") -> pa.Table:
    n = len(ids)
    datasets = dataset if isinstance(dataset, list) else [dataset] * n
    vectors = np.asarray(vectors, dtype=np.float32)
    return pa.table(
        {
            "image_id": list(ids),
            "uri": [f"file:///img/{i}.jpg" for i in ids],
            "dataset": datasets,
            "width": pa.array([640] * n, pa.int32()),
            "height": pa.array([480] * n, pa.int32()),
            "model_revision": ["rev0"] * n,
            "run_id": [run_id] * n,
            "created_at": pa.array([datetime(2026, 1, 1, tzinfo=timezone.utc)] * n, TIMESTAMP),
            VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
        }
    )


def random_rows(start, stop, seed=0, dataset=None):
    rng = np.random.default_rng(seed)
    ids = [f"id{i:06d}" for i in range(start, stop)]
    datasets = dataset or ["b" if i % 2 else "a" for i in range(start, stop)]
    return make_rows(ids, unit(rng.standard_normal((stop - start, DIM))), datasets)


@pytest.fixture
def lake(tmp_path) -> str:
    return str(tmp_path / "lake")


def index_types(table: VectorTable) -> dict[str, str]:
    return {ix.columns[0]: ix.index_type for ix in table.table.list_indices()}


def test_lance_uri():
    assert lance_uri("/data/lake") == "/data/lake/lance"
    assert lance_uri("/data/lake/") == "/data/lake/lance"
    assert lance_uri("s3://bucket/lake/") == "s3://bucket/lake/lance"
    assert lance_uri("s3://bucket") == "s3://bucket/lance"


def test_open_creates_empty_table(lake, tmp_path):
    table = VectorTable.open(lake, "dinov2", DIM)
    assert (table.name, table.dim, table.count()) == ("dinov2", DIM, 0)
    assert table.table.schema == vector_table_schema(DIM)
    assert (tmp_path / "lake" / "lance" / "dinov2.lance").is_dir()
    again = VectorTable.open(lake, "dinov2", DIM)
    assert (again.count(), again.version) == (0, table.version)


def test_merge_upserts_by_image_id(lake):
    table = VectorTable.open(lake, "dinov2", DIM)
    v0 = table.version
    vectors = unit(np.eye(3, DIM))
    v1 = table.merge(make_rows(["x", "y", "z"], vectors))
    assert v1 > v0 and table.count() == 3

    changed = vectors.copy()
    changed[1] = unit(np.ones(DIM))
    v2 = table.merge(make_rows(["x", "y", "z"], changed, run_id="r2"))
    assert v2 > v1 and table.version == v2
    assert table.count() == 3
    got = table.get(["z", "y", "missing", "x"])
    assert got.column("image_id").to_pylist() == ["z", "y", "x"]
    assert got.column("run_id").to_pylist() == ["r2", "r2", "r2"]
    np.testing.assert_allclose(got.column(VECTOR_COLUMN).to_pylist()[1], changed[1], rtol=1e-6)
    np.testing.assert_allclose(got.column(VECTOR_COLUMN).to_pylist()[2], vectors[0], rtol=1e-6)


def test_merge_dedups_within_batch_keeping_last(lake):
    table = VectorTable.open(lake, "dinov2", DIM)
    rows = pa.concat_tables(
        [make_rows(["dup"], unit(np.eye(1, DIM)), run_id="first"),
         make_rows(["other"], unit(np.eye(1, DIM, 1))),
         make_rows(["dup"], unit(np.eye(1, DIM, 2)), run_id="last")]
    )  # fmt: skip
    table.merge(rows)
    assert table.count() == 2
    got = table.get(["dup"])
    assert got.num_rows == 1 and got.column("run_id").to_pylist() == ["last"]
    assert table.table.count_rows("image_id = 'dup'") == 1


def test_merge_empty_writes_nothing_and_conforms_columns(lake):
    table = VectorTable.open(lake, "dinov2", DIM)
    v0 = table.version
    assert table.merge(make_rows([], np.zeros((0, DIM)))) == v0 == table.version
    # embeddings-style rows: `embedding` for `vector`, extra columns dropped, missing ones null
    vectors = unit(np.eye(2, DIM))
    rows = pa.table(
        {"image_id": ["p", "q"], "size_bytes": [10, 20],
         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)}
    )  # fmt: skip
    assert table.merge(rows) == v0 + 1
    got = table.get(["p", "q"])
    assert got.column("dataset").to_pylist() == [None, None]
    assert "size_bytes" not in got.column_names


def test_merge_rejects_bad_rows(lake):
    table = VectorTable.open(lake, "dinov2", DIM)
    with pytest.raises(ValueError, match=r"dim 8, table 'dinov2' has 16"):
        table.merge(make_rows(["a"], np.ones((1, 8))))
    with pytest.raises(ValueError, match="required column 'image_id'"):
        table.merge(make_rows(["a"], np.ones((1, DIM))).drop_columns(["image_id"]))
    assert table.count() == 0


def test_dim_mismatch_on_reopen(lake):
    VectorTable.open(lake, "dinov2", DIM)
    with pytest.raises(ValueError, match=r"dim 16.*dim 32"):
        VectorTable.open(lake, "dinov2", 32)
    assert VectorTable.open(lake, "other", 32).dim == 32


def test_refresh_index_lifecycle(lake):
    table = VectorTable.open(lake, "dinov2", DIM)
    table.merge(random_rows(0, 999))
    assert table.refresh_index(SMALL) == "flat"
    assert index_types(table) == {}

    table.merge(random_rows(999, 1200, seed=1))
    assert table.refresh_index(SMALL) == "created"
    assert index_types(table) == {"vector": "IvfHnswSq", "image_id": "BTree", "dataset": "Bitmap"}
    stats = table.table.index_stats("vector_idx")
    assert (stats.num_indexed_rows, stats.num_unindexed_rows, stats.distance_type) == (1200, 0, "cosine")
    assert table.refresh_index(SMALL) == "current"

    table.merge(random_rows(1200, 1400, seed=2))  # 200 unindexed <= 20% of 1200: left to the flat tail
    assert table.refresh_index(SMALL) == "current"
    assert table.table.index_stats("vector_idx").num_unindexed_rows == 200

    table.merge(random_rows(1400, 1500, seed=3))  # 300 > 240: appended to the indices
    assert table.refresh_index(SMALL) == "optimized"
    stats = table.table.index_stats("vector_idx")
    assert (stats.num_indexed_rows, stats.num_unindexed_rows, stats.num_indices) == (1500, 0, 2)
    assert table.table.index_stats("image_id_idx").num_unindexed_rows == 0

    table.merge(random_rows(1500, 2000, seed=4))  # max_deltas reached: retrained as one index
    assert table.refresh_index(IndexPolicy(min_rows=1000, max_deltas=2)) == "optimized"
    stats = table.table.index_stats("vector_idx")
    assert (stats.num_indexed_rows, stats.num_unindexed_rows, stats.num_indices) == (2000, 0, 1)

    assert table.refresh_index(IndexPolicy(min_rows=1000, metric="l2")) == "created"
    assert table.table.index_stats("vector_idx").distance_type == "l2"
    assert table.count() == 2000


@pytest.mark.parametrize("indexed", [False, True])
def test_search_prefilters(lake, indexed):
    table = VectorTable.open(lake, "dinov2", DIM)
    rows = random_rows(0, 1200)
    table.merge(rows)
    table.merge(random_rows(5000, 5003, seed=9, dataset=["c"] * 3))
    assert table.refresh_index(SMALL if indexed else IndexPolicy()) == ("created" if indexed else "flat")
    query = np.asarray(rows.column(VECTOR_COLUMN).to_pylist()[0])  # id000000, dataset "a"

    hits = table.search(query, k=10, where="dataset = 'b'")
    assert hits.num_rows == 10
    assert set(hits.column("dataset").to_pylist()) == {"b"}
    distances = hits.column("_distance").to_numpy()
    assert np.all(np.diff(distances) >= 0) and distances[0] > 1e-3  # the query itself is in "a"

    rare = table.search(query, k=10, where="dataset = 'c'")  # fewer matches than k: all of them
    assert sorted(rare.column("image_id").to_pylist()) == ["id005000", "id005001", "id005002"]

    top = table.search(query, k=5)
    exact = table.search(query, k=5, exact=True)
    assert top.column("image_id").to_pylist()[0] == exact.column("image_id").to_pylist()[0] == "id000000"
    assert exact.column("_distance").to_pylist()[0] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="query has dim 3"):
        table.search([1.0, 0.0, 0.0])


def embedding_like(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Clustered like real embeddings: gaussian blobs of varied spread around random directions."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    spread = rng.uniform(0.2, 0.6, clusters).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    noise = rng.standard_normal((n, dim)).astype(np.float32)
    return unit(centers[labels] + spread[labels, None] * noise)


@pytest.mark.slow
def test_ann_recall_at_default_policy(lake):
    n, dim, k = 20_000, 128, 10
    corpus = embedding_like(n, dim, clusters=200, seed=0)
    rng = np.random.default_rng(1)
    queries = unit(corpus[rng.choice(n, 100, replace=False)] + 0.05 * rng.standard_normal((100, dim)))
    ids = [f"img{i:06d}" for i in range(n)]
    table = VectorTable.open(lake, "dinov2", dim)
    table.merge(make_rows(ids, corpus, ["a", "b"] * (n // 2)))

    policy = IndexPolicy()
    start = time.perf_counter()
    assert table.refresh_index(policy) == "created"
    build_s = time.perf_counter() - start
    plan = table.query(queries[0], k=k, policy=policy).explain_plan()
    assert "ANNSubIndex: name=vector_idx" in plan and "metric=Cosine" in plan  # the index, not a fallback
    assert "ANNSubIndex" not in table.query(queries[0], k=k, policy=policy, exact=True).explain_plan()

    truth = np.argsort(-(queries @ corpus.T), axis=1)[:, :k]
    recall, exact_agrees, query_s = 0.0, 0, 0.0
    for q, want in zip(queries, truth, strict=True):
        expected = {ids[i] for i in want}
        exact = table.search(q, k=k, policy=policy, exact=True).column("image_id").to_pylist()
        exact_agrees += len(expected & set(exact))
        start = time.perf_counter()
        ann = table.search(q, k=k, policy=policy).column("image_id").to_pylist()
        query_s += time.perf_counter() - start
        assert len(ann) == k
        recall += len(set(exact) & set(ann)) / k
    recall /= len(queries)
    print(f"\nIVF-HNSW-SQ on {n}x{dim}: build {build_s:.1f} s, recall@{k} {recall:.3f}, "
          f"{1000 * query_s / len(queries):.1f} ms/query")  # fmt: skip
    assert exact_agrees >= len(queries) * k - 2  # exact=True is brute force (ties aside)
    assert recall >= 0.95


def test_s3_open_merge_search(s3):
    import s3fs

    bucket, options = s3
    lake = f"s3://{bucket}/lake"
    assert lance_storage_options(options, lake)["aws_endpoint"] == options["endpoint_url"]
    table = VectorTable.open(lake, "dinov2", DIM, storage_options=options)
    vectors = unit(np.eye(4, DIM))
    version = table.merge(make_rows(["a", "b", "c", "d"], vectors, ["x", "x", "y", "y"]))
    assert table.count() == 4 and version == table.version

    hits = table.search(vectors[2], k=2, where="dataset = 'y'")
    assert hits.column("image_id").to_pylist() == ["c", "d"]
    assert hits.column("_distance").to_pylist()[0] == pytest.approx(0.0, abs=1e-6)

    # LanceDB-style options work as well, and the data really is in the bucket
    reopened = VectorTable.open(lake, "dinov2", DIM, storage_options=lance_storage_options(options))
    assert reopened.get(["d"]).column("dataset").to_pylist() == ["y"]
    fs = s3fs.S3FileSystem(**options)
    assert fs.ls(f"{bucket}/lake/lance", detail=False) == [f"{bucket}/lake/lance/dinov2.lance"]


def test_lance_storage_options_mapping(monkeypatch):
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    fsspec_style = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s", "token": "t",
                    "client_kwargs": {"region_name": "eu-west-1"}}  # fmt: skip
    mapped = lance_storage_options(fsspec_style)
    assert mapped == {
        "aws_endpoint": "http://127.0.0.1:9000",
        "allow_http": "true",
        "aws_access_key_id": "k",
        "aws_secret_access_key": "s",
        "aws_session_token": "t",
        "aws_region": "eu-west-1",
    }
    assert lance_storage_options(mapped) == mapped  # already LanceDB-style: unchanged
    assert lance_storage_options(fsspec_style, "/local/lake") == {}
    assert lance_storage_options(fsspec_style, "s3://b/lake") == mapped

    assert lance_storage_options(None) == {"aws_region": "us-east-1"}
    assert lance_storage_options({"anon": True}) == {"aws_region": "us-east-1", "aws_skip_signature": "true"}

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert lance_storage_options({"client_kwargs": {"endpoint_url": "https://minio.example"}}) == {
        "aws_endpoint": "https://minio.example",
        "aws_access_key_id": "env-key",
        "aws_secret_access_key": "env-secret",
        "aws_region": "ap-south-1",
    }
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert lance_storage_options({"key": "k", "secret": "s"}) == {
        "aws_access_key_id": "k",
        "aws_secret_access_key": "s",
        "aws_region": "us-west-2",
    }
