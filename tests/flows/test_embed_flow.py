"""The embed flow end to end: Prefect (test harness) + local Ray with 2 CPU actors + the lake."""

from __future__ import annotations

import json
import os
import time

import duckdb
import numpy as np
import pytest

import encoders
from flows.demo import make_corpus
from flows.embed import embed_corpus
from storage.vectors import VectorTable

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local", "prefect_harness")]
N_IMAGES = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = make_corpus(root / "images", N_IMAGES, seed=3)
    return root / "images", files


def duck(tmp_path):
    con = duckdb.connect()
    con.execute(f"SET extension_directory = '{tmp_path / 'duckdb-ext'}'")
    return con


def run(source, lake, weights, model="qwen2_5_vl", **kw):
    return embed_corpus(source=str(source), out=str(lake), model=model, weights=str(weights), actors=2,
                        quiet=True, **kw)  # fmt: skip


def test_end_to_end_exactly_once_then_resume(corpus, checkpoint, tmp_path):
    source, files = corpus
    lake = tmp_path / "lake"
    weights = checkpoint("qwen2_5_vl")
    summary = run(source, lake, weights)
    c = summary["counts"]
    assert summary["status"] == "succeeded"
    assert c["listed"] == N_IMAGES + 2 and c["embedded"] == N_IMAGES and c["errors"] == 2
    assert c["embedded"] + c["errors"] + c["skipped_done"] == c["listed"]
    assert summary["errors_by_reason"] == {"decode/not_an_image": 1, "decode/truncated": 1}

    con = duck(tmp_path)
    emb = f"read_parquet('{lake}/embeddings/**/*.parquet', hive_partitioning=true)"
    assert con.execute(f"SELECT count(*), count(DISTINCT uri) FROM {emb}").fetchone() == (N_IMAGES, N_IMAGES)
    assert con.execute(f"SELECT DISTINCT model, dataset FROM {emb}").fetchall() == [("qwen2_5_vl", "default")]
    dim = encoders.load("qwen2_5_vl", weights).dim
    cos = f"array_cosine_similarity(embedding::FLOAT[{dim}], embedding::FLOAT[{dim}])"
    sim = con.execute(f"SELECT min({cos}) FROM {emb}").fetchone()[0]
    assert abs(sim - 1) < 1e-5
    patches = f"read_parquet('{lake}/patches/**/*.parquet', hive_partitioning=true)"
    assert con.execute(f"SELECT count(*), min(len(tokens) = grid_h * grid_w) FROM {patches}").fetchone() == (
        N_IMAGES, True)  # fmt: skip
    errors = con.execute(
        f"SELECT uri, stage FROM read_parquet('{lake}/errors/**/*.parquet', hive_partitioning=true) "
        "ORDER BY uri"
    ).fetchall()
    assert [(os.path.basename(u), s) for u, s in errors] == [
        ("broken-not-an-image.png", "decode"), ("broken-truncated.jpg", "decode")]  # fmt: skip
    table = VectorTable.open(str(lake), "qwen2_5_vl", dim)
    ids = table.table.to_arrow()["image_id"].to_pylist()
    parquet_ids = {r[0] for r in con.execute(f"SELECT image_id FROM {emb}").fetchall()}
    assert len(ids) == len(set(ids)) == len(parquet_ids) and set(ids) == parquet_ids
    manifest = json.loads((lake / "_runs" / f"{summary['run_id']}.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["counts"]["embedded"] == N_IMAGES
    assert not (lake / "_staging").exists() or not any((lake / "_staging").rglob("*.parquet"))

    again = run(source, lake, weights)
    assert again["counts"]["planned"] == 0 and again["counts"]["embedded"] == 0
    assert again["counts"]["skipped_done"] == N_IMAGES + 2

    changed = next(f for f in files if f.suffix == ".png" and "broken" not in f.name)
    time.sleep(0.01)
    changed.write_bytes(changed.read_bytes() + b"\0")  # new size and mtime: a new input version
    third = run(source, lake, weights)
    assert third["counts"]["planned"] == 1 and third["counts"]["embedded"] == 1
    rows = con.execute(f"SELECT count(*) FROM {emb} WHERE uri = ?", [str(changed)]).fetchone()[0]
    assert rows == 2  # both versions are kept, each once


def test_flow_embeddings_equal_the_python_api(corpus, checkpoint, tmp_path):
    source, files = corpus
    lake = tmp_path / "lake"
    weights = checkpoint("dinov2")
    run(source, lake, weights, model="dinov2", limit=20)
    con = duck(tmp_path)
    rows = con.execute(
        f"SELECT uri, embedding FROM read_parquet('{lake}/embeddings/**/*.parquet', hive_partitioning=true) "
        "ORDER BY uri"
    ).fetchall()
    assert len(rows) == 20
    enc = encoders.load("dinov2", weights)
    expected = enc.embed([u for u, _ in rows]).pooled
    np.testing.assert_allclose(np.array([e for _, e in rows], dtype=np.float32), expected, atol=1e-5)


def test_a_buffer_smaller_than_one_block_still_streams(corpus, checkpoint, tmp_path):
    """--buffer-mb bounds decoded input in flight; below one block's size Ray Data still makes
    progress (one block at a time) and the driver still commits shards as they arrive."""
    source, _ = corpus
    lake = tmp_path / "lake"
    summary = run(source, lake, checkpoint("dinov2"), model="dinov2", limit=60, batch_images=16, buffer_mb=1)
    assert summary["status"] == "succeeded" and summary["counts"]["embedded"] == 60
    manifest = json.loads((lake / "_runs" / f"{summary['run_id']}.json").read_text())
    assert len(manifest["committed_shards"]) >= 2
    assert 1 <= summary["timings"]["commits"] <= len(manifest["committed_shards"])  # shards grouped or not
    emb = f"read_parquet('{lake}/embeddings/**/*.parquet', hive_partitioning=true)"
    assert duck(tmp_path).execute(f"SELECT count(DISTINCT uri) FROM {emb}").fetchone()[0] == 60
    from ray.data import DataContext

    # the budget Ray Data's backpressure worked against (the default is a fraction of the object store)
    assert DataContext.get_current().execution_options.resource_limits.object_store_memory == 2**20


def test_several_models_from_one_decode_pass(corpus, checkpoint, tmp_path):
    source, _ = corpus
    lake = tmp_path / "lake"
    weights = f"qwen3_vl={checkpoint('qwen3_vl')},glm4v={checkpoint('glm4v')}"
    summary = run(source, lake, weights, model="qwen3_vl,glm4v", limit=30, patches=False)
    assert summary["counts"]["embedded"] == 30
    con = duck(tmp_path)
    got = con.execute(
        f"SELECT model, count(*) FROM read_parquet('{lake}/embeddings/**/*.parquet', hive_partitioning=true) "
        "GROUP BY model ORDER BY model"
    ).fetchall()
    assert got == [("glm4v", 30), ("qwen3_vl", 30)]
    assert not (lake / "patches").exists()


def test_source_and_lake_on_s3(corpus, checkpoint, s3, tmp_path):
    import s3fs

    bucket, options = s3
    source, files = corpus
    fs = s3fs.S3FileSystem(**options)
    picked = sorted(files)[:24] + [f for f in files if "broken" in f.name]
    for f in picked:
        fs.put_file(str(f), f"{bucket}/photos/{f.name}")
    lake = f"s3://{bucket}/lake"
    summary = embed_corpus(
        source=f"s3://{bucket}/photos", out=lake, model="qwen2_5_vl", weights=str(checkpoint("qwen2_5_vl")),
        actors=2, quiet=True, source_options=options, lake_options=options,
    )  # fmt: skip
    c = summary["counts"]
    assert (c["listed"], c["embedded"], c["errors"]) == (len(picked), len(picked) - 2, 2)
    con = duck(tmp_path)
    con.register_filesystem(fs)
    got = con.execute(
        f"SELECT count(*), count(DISTINCT uri), min(uri) FROM read_parquet('{lake}/embeddings/**/*.parquet', "
        "hive_partitioning=true)"
    ).fetchone()
    assert got[:2] == (len(picked) - 2, len(picked) - 2) and got[2].startswith(f"s3://{bucket}/photos/")
    table = VectorTable.open(
        lake, "qwen2_5_vl", encoders.load("qwen2_5_vl", checkpoint("qwen2_5_vl")).dim, options
    )
    assert table.count() == len(picked) - 2
    assert not fs.exists(f"{bucket}/lake/_staging") or fs.find(f"{bucket}/lake/_staging") == []
    again = embed_corpus(
        source=f"s3://{bucket}/photos", out=lake, model="qwen2_5_vl", weights=str(checkpoint("qwen2_5_vl")),
        actors=2, quiet=True, source_options=options, lake_options=options,
    )  # fmt: skip
    assert again["counts"]["embedded"] == 0 and again["counts"]["skipped_done"] == len(picked)


def test_an_entry_the_listing_cannot_read_is_an_error_row(checkpoint, tmp_path):
    source = tmp_path / "images"
    make_corpus(source, 6, seed=8)
    (source / "dangling.jpg").symlink_to(source / "nowhere.jpg")
    lake = tmp_path / "lake"
    summary = run(source, lake, checkpoint("dinov2"), model="dinov2")
    assert summary["counts"]["list_errors"] == 1 and summary["counts"]["embedded"] == 6
    assert summary["errors_by_reason"]["list/FileNotFoundError"] == 1
    rows = duck(tmp_path).execute(
        f"SELECT uri, stage, error_type, message FROM read_parquet('{lake}/errors/**/*.parquet', "
        "hive_partitioning=true) WHERE stage = 'list'"
    ).fetchall()
    assert len(rows) == 1 and rows[0][0] == str(source / "dangling.jpg") and rows[0][3]
