"""DuckDB views over a lake: committed files only, hive partitions, vectors castable to FLOAT[D]."""

from __future__ import annotations

from _lake_rows import DIM, embeddings, errors

from storage.commit import Committer, stage_shard
from storage.lake import Lake, new_run_id
from storage.sql import connect, views


def test_views_over_a_local_lake(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    tables = {
        ("embeddings", "dinov2"): embeddings(["a.jpg", "b.jpg"], run),
        ("errors", None): errors(["c.jpg"], run),
    }
    Committer(lake).commit(stage_shard(lake, run, "00000", "photos", tables))
    stage_shard(
        lake, run, "00001", "photos", {("embeddings", "dinov2"): embeddings(["z.jpg"], run)}
    )  # staged only
    con = connect(lake, str(tmp_path / "ext"))
    assert views(con) == ["embeddings", "errors"]
    assert con.execute("SELECT model, dataset, count(*) FROM embeddings GROUP BY ALL").fetchall() == [
        ("dinov2", "photos", 2)
    ]
    sim = con.execute(
        f"SELECT array_cosine_similarity(embedding::FLOAT[{DIM}], embedding::FLOAT[{DIM}]) FROM embeddings"
    ).fetchall()
    assert all(abs(s - 1) < 1e-6 for (s,) in sim)
    assert con.execute("SELECT uri, stage FROM errors").fetchall() == [("c.jpg", "decode")]


def test_views_over_an_s3_lake(s3, tmp_path):
    bucket, options = s3
    lake = Lake(f"s3://{bucket}/lake", options)
    run = new_run_id()
    Committer(lake).commit(
        stage_shard(lake, run, "00000", "d", {("embeddings", "m"): embeddings(["x.jpg"], run)})
    )
    con = connect(lake, str(tmp_path / "ext"))
    assert con.execute("SELECT uri, model, dataset FROM embeddings").fetchall() == [("x.jpg", "m", "d")]
