"""Dedup: planted near-duplicates found from k-NN queries (never all pairs), exact duplicates via SQL."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import encoders
from flows.cli import main
from storage.commit import Committer, stage_shard
from storage.lake import Lake, new_run_id
from storage.schema import embeddings_schema
from storage.vectors import IndexPolicy, VectorTable
from tasks import montage
from tasks.dedup import DedupConfig, UnionFind, exact_duplicates, groups_picture, near_duplicates, open_table

MODEL = "dinov2"
NOW = pa.scalar(0, pa.timestamp("us", "UTC")).as_py()
# The tiny random-weight DINOv2 maps photos to a narrow cone: resized / re-encoded copies of an image score
# >= 0.9999 against it, distinct images <= 0.991 (mean-pooled). A real model spreads them far wider (0.95
# is the default there); the cut below sits between the two for this model.
THRESHOLD = 0.999


def blobby(seed: int, height: int = 200, width: int = 260) -> Image.Image:
    """A distinct smooth image: a random 4x5 colour field, bicubically upsampled."""
    cells = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.BICUBIC)


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def smaller(data: bytes, factor: float = 0.6) -> Image.Image:
    img = decoded(data)
    return img.resize((int(img.width * factor), int(img.height * factor)), Image.BICUBIC)


@pytest.fixture(scope="module")
def photo_lake(tmp_path_factory, checkpoint) -> tuple[str, dict[str, str], list[set[str]], set[str]]:
    """24 distinct photos, 8 planted near-duplicates of 7 of them, and one file stored twice (same bytes).

    Embedded with a tiny DINOv2 through encoders.load(...).embed, committed as the embed flow commits (the
    Committer writes Parquet and merges each shard into the vector table). Returns (lake, name -> uri,
    planted near-duplicate groups as sets of names, the pair of uris that are one file).
    """
    root = tmp_path_factory.mktemp("photos")
    originals = {f"orig_{i:02d}": jpeg(blobby(i), 92) for i in range(24)}
    files = dict(originals)
    planted: list[set[str]] = []
    for i in range(4):  # 60 % size, re-encoded
        files[f"copy_small_{i:02d}"] = jpeg(smaller(originals[f"orig_{i:02d}"]), 75)
        planted.append({f"orig_{i:02d}", f"copy_small_{i:02d}"})
    for i in (4, 5):  # same size, re-encoded at a low quality
        files[f"copy_q60_{i:02d}"] = jpeg(decoded(originals[f"orig_{i:02d}"]), 60)
        planted.append({f"orig_{i:02d}", f"copy_q60_{i:02d}"})
    files["copy_small_06"] = jpeg(smaller(originals["orig_06"], 0.5), 80)  # a group of three
    files["copy_q55_06"] = jpeg(decoded(originals["orig_06"]), 55)
    planted.append({"orig_06", "copy_small_06", "copy_q55_06"})
    uris = {}
    for name, data in files.items():
        (root / f"{name}.jpg").write_bytes(data)
        uris[name] = str(root / f"{name}.jpg")
    (root / "again").mkdir()
    (root / "again" / "orig_07.jpg").write_bytes(files["orig_07"])  # the same bytes at a second uri
    uris["again_07"] = str(root / "again" / "orig_07.jpg")
    files["again_07"] = files["orig_07"]

    enc = encoders.load(MODEL, str(checkpoint(MODEL)))
    names = list(files)
    out = enc.embed([uris[n] for n in names], pooling="mean")
    n = len(names)
    rows = pa.table(
        {
            "image_id": [hashlib.sha256(files[k]).hexdigest() for k in names],
            "uri": [uris[k] for k in names], "size_bytes": [len(files[k]) for k in names],
            "source_version": ["v1"] * n,
            "width": [w for w, _ in out.sizes], "height": [h for _, h in out.sizes],
            "grid_h": [g[0] for g in out.grids], "grid_w": [g[1] for g in out.grids],
            "model_revision": [enc.revision] * n, "preprocess": [enc.preprocess_hash] * n,
            "dtype": ["float32"] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(out.pooled.reshape(-1)), enc.dim),
            "run_id": ["r1"] * n, "created_at": [NOW] * n,
        },
        schema=embeddings_schema(enc.dim),
    )  # fmt: skip
    lake = Lake(str(root / "lake"))
    table = VectorTable.open(lake.url, MODEL, enc.dim)

    def merge(model: str, dataset: str, committed: pa.Table) -> None:
        table.merge(committed.append_column("dataset", pa.array([dataset] * committed.num_rows)))

    run_id, committer = new_run_id(), Committer(lake, merge)
    for i, start in enumerate(range(0, n, 12)):
        committer.commit(
            stage_shard(lake, run_id, f"{i:05d}", "photos", {("embeddings", MODEL): rows[start:][:12]})
        )
    return lake.url, uris, planted, {uris["orig_07"], uris["again_07"]}


class CountingTable:
    """The real VectorTable, with every k-NN request recorded (rows asked per call)."""

    def __init__(self, table: VectorTable):
        self.inner, self.requested = table, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def query(self, vector, k: int = 10, where=None, **kwargs):
        self.requested.append((k, np.asarray(vector).shape))
        return self.inner.query(vector, k, where, **kwargs)

    def search(self, vector, k: int = 10, where=None, **kwargs):
        self.requested.append((k, np.asarray(vector).shape))
        return self.inner.search(vector, k, where, **kwargs)


def group_sets(groups: pa.Table, names_by_uri: dict[str, str]) -> list[set[str]]:
    by_group: dict[int, set[str]] = {}
    for uri, gid in zip(groups["uri"].to_pylist(), groups["group_id"].to_pylist(), strict=True):
        by_group.setdefault(gid, set()).add(names_by_uri[uri])
    return [by_group[g] for g in sorted(by_group)]


def test_union_find_joins_chains_and_keeps_singletons_out():
    sets = UnionFind()
    for a, b in [("a", "b"), ("c", "d"), ("b", "c"), ("x", "y"), ("d", "a")]:
        sets.union(a, b)
    assert sorted(sets.groups()) == [["a", "b", "c", "d"], ["x", "y"]]
    assert sets.find("d") == sets.find("a") != sets.find("x")


def test_planted_near_duplicates_are_grouped_from_batched_knn(photo_lake):
    lake, uris, planted, _ = photo_lake
    names_by_uri = {u: n for n, u in uris.items() if n != "again_07"}
    names_by_uri[uris["again_07"]] = "orig_07"  # one image_id: the table holds one of its two uris
    cfg = DedupConfig(lake=lake, model=MODEL, threshold=THRESHOLD, k=5, batch_size=7, workers=2)
    table = CountingTable(open_table(cfg))
    near = near_duplicates(cfg, table)

    rows = table.count()
    assert rows == 32 and near.images == rows and near.max_batch_rows == 7
    # one single-vector k-NN request per image, k + 1 rows each (itself included): never all rows
    assert table.requested == [(6, (32,))] * rows
    got = group_sets(near.groups, names_by_uri)
    assert sorted(map(sorted, got)) == sorted(map(sorted, planted))
    assert [len(g) for g in got] == [3, 2, 2, 2, 2, 2, 2]  # group 0 is the largest
    members = dict(zip(near.groups["image_id"].to_pylist(), near.groups["group_id"].to_pylist(), strict=True))
    for row in near.groups.to_pylist():
        assert row["nearest"] != row["image_id"] and members[row["nearest"]] == row["group_id"]
        assert THRESHOLD <= row["score"] <= 1.0 + 1e-6
        if len(got[row["group_id"]]) == 2:  # a pair: each is the other's nearest, with the same score
            other = next(r for r in near.groups.to_pylist() if r["image_id"] == row["nearest"])
            assert other["nearest"] == row["image_id"] and other["score"] == pytest.approx(row["score"])


def test_no_false_groups_among_distinct_images_and_exact_duplicates_reported(photo_lake):
    lake, uris, _, same_file = photo_lake
    cfg = DedupConfig(lake=lake, model=MODEL, threshold=THRESHOLD, k=10, where="uri NOT LIKE '%copy%'")
    near = near_duplicates(cfg, open_table(cfg))
    assert near.images == 24 and near.groups.num_rows == 0  # 24 distinct photos: no group at all
    exact = exact_duplicates(cfg)
    assert exact.schema.names == ["image_id", "uri", "group_id"]
    assert set(exact["uri"].to_pylist()) == same_file and exact["group_id"].to_pylist() == [0, 0]
    assert len(set(exact["image_id"].to_pylist())) == 1
    assert exact["image_id"][0].as_py() == hashlib.sha256(Path(uris["orig_07"]).read_bytes()).hexdigest()

    picture = Image.open(io.BytesIO(groups_picture(cfg, near.groups, exact)))
    assert picture.size == montage.GROUPS_SIZE


def test_default_threshold_on_an_ann_index_finds_planted_pairs_only(tmp_path):
    """2,000 random unit vectors, 30 planted copies (cosine ~0.995) and 20 decoys (~0.90), ANN-indexed."""
    rng = np.random.default_rng(5)
    dim, n = 64, 2000
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def near(i: int, cos: float) -> np.ndarray:
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= noise @ vectors[i] * vectors[i]
        return cos * vectors[i] + np.sqrt(1 - cos**2) * noise / np.linalg.norm(noise)

    planted = {(i, 1000 + i) for i in range(30)}
    for i, j in planted:
        vectors[j] = near(i, 0.995)
    for j in range(1500, 1520):
        vectors[j] = near(j - 1400, 0.90)  # below 0.95: must stay apart
    ids = [f"id{i:05d}" for i in range(n)]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    rows = pa.table(
        {"image_id": ids, "uri": [f"s3://b/{i}.jpg" for i in ids], "dataset": ["a"] * n, "vector": column}
    )
    lake = str(tmp_path / "lake")
    vt = VectorTable.open(lake, "synthetic", dim)
    vt.merge(rows)
    assert vt.refresh_index(IndexPolicy(min_rows=1000)) == "created"

    cfg = DedupConfig(lake=lake, model="synthetic", k=10, batch_size=500)
    table = CountingTable(open_table(cfg))
    result = near_duplicates(cfg, table)
    assert len(table.requested) == n and {k for k, _ in table.requested} == {11}
    found = {tuple(sorted(g)) for g in group_sets(result.groups, {f"s3://b/{i}.jpg": i for i in ids})}
    assert found == {(f"id{i:05d}", f"id{j:05d}") for i, j in planted}
    np.testing.assert_allclose(result.groups["score"].to_numpy(), 0.995, atol=2e-3)


def _cli(argv: list[str]) -> int:
    return main(argv)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
        (["--k", "0"], "--k, batch size and workers must be positive"),
        (["--model", "nope"], "no vector table for model 'nope'"),
        (["--where", "datset = 'photos'"], "--where \"datset = 'photos'\": "),
        (["--where", "dataset = = 1"], "--where 'dataset = = 1': "),
    ],
)
def test_bad_requests_exit_2_with_one_line(photo_lake, capsys, extra, message):
    lake, _, _, _ = photo_lake
    argv = ["dedup", lake, "--model", MODEL, *extra]
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("towerflow: error: ") and message in err, err


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_dedup_flow_through_the_cli(photo_lake, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    lake, uris, planted, same_file = photo_lake
    assert _cli(["dedup", lake, "--model", MODEL, "--threshold", str(THRESHOLD), "--k", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 32 and summary["near_groups"] == len(planted) == 7
    assert summary["group_sizes"] == [3, 2, 2, 2, 2, 2, 2] and summary["near_images"] == 15
    assert (summary["exact_groups"], summary["exact_rows"]) == (1, 2)
    base = Path(lake) / "duplicates" / f"model={MODEL}" / f"run={summary['run_id']}"
    assert summary["outputs"]["groups.png"] == str(base / "groups.png")
    picture = Image.open(base / "groups.png")
    assert picture.size == montage.GROUPS_SIZE and (base / "groups.png").stat().st_size > 5000
    con = duckdb.connect()
    got = con.execute(
        f"SELECT model, run, count(*), count(DISTINCT group_id), min(score) FROM read_parquet("
        f"'{lake}/duplicates/**/groups.parquet', hive_partitioning=true) GROUP BY ALL"
    ).fetchall()
    assert got[0][:4] == (MODEL, summary["run_id"], 15, 7) and got[0][4] >= THRESHOLD
    exact = con.execute(f"SELECT uri FROM read_parquet('{base}/exact.parquet') ORDER BY uri").fetchall()
    assert {u for (u,) in exact} == same_file
    with get_client(sync_client=True) as client:
        report = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dedup-report"]))
        )
    assert report and summary["run_id"] in report[0].data and "near-duplicate groups: 7" in report[0].data


def test_dedup_a_lake_on_s3(s3):
    from tasks.dedup import write_duplicates

    bucket, options = s3
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((60, 16)).astype(np.float32)
    vectors[50] = vectors[7] * 1.01  # the same direction: cosine 1
    ids = [f"id{i:03d}" for i in range(60)]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 16)
    lake = f"s3://{bucket}/lake"
    VectorTable.open(lake, "s3model", 16, options).merge(
        pa.table({"image_id": ids, "uri": [f"s3://{bucket}/{i}.jpg" for i in ids], "vector": column})
    )
    cfg = DedupConfig(lake=lake, model="s3model", k=3, storage_options=options)
    near = near_duplicates(cfg, open_table(cfg))
    assert sorted(near.groups["image_id"].to_pylist()) == ["id007", "id050"]
    assert near.groups["score"].to_numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    exact = exact_duplicates(cfg)  # no Parquet in this lake: nothing to report
    summary = write_duplicates.fn(cfg, "20261126T000000Z-s3s3s3", near, exact)
    assert (summary["near_groups"], summary["exact_groups"]) == (1, 0)
    written = Lake(lake, options).list_files("duplicates", suffix="")
    assert [p.rsplit("/", 1)[-1] for p in written] == [
        "exact.parquet",
        "groups.parquet",
        "groups.png",
        "summary.json",
    ]
