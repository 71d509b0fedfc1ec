"""The lake: safe names, staged shards, exactly-once commit, crash recovery, ledger, manifests, DuckDB."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest
from _lake_rows import DIM, embeddings, errors, key, patches

from storage.commit import Committer, Ledger, StagedShard, commit_record_path, recover, stage_shard
from storage.lake import Lake, check_name, new_run_id
from storage.manifest import (
    EncoderRecord,
    RunManifest,
    abandon_dead_runs,
    list_manifests,
    read_manifest,
    write_manifest,
)

MODEL, DATASET = "qwen2_5_vl", "photos"


def duck(tmp_path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(f"SET extension_directory = '{tmp_path / 'duckdb-ext'}'")
    return con


def count_rows(con, lake: Lake, kind: str) -> int:
    return con.execute(
        f"SELECT count(*) FROM read_parquet('{lake.base}/{kind}/**/*.parquet', hive_partitioning=true)"
    ).fetchone()[0]


def stage(lake, run_id, shard, uris, with_patches=True, bad=()):
    tables = {("embeddings", MODEL): embeddings(uris, run_id)}
    if with_patches:
        tables[("patches", MODEL)] = patches(uris, run_id)
    if bad:
        tables[("errors", None)] = errors(list(bad), run_id)
    return stage_shard(lake, run_id, shard, DATASET, tables)


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "", ".hidden", "x..y", "a b", "é", "x" * 129])
def test_names_cannot_escape_the_lake(bad):
    with pytest.raises(ValueError, match="is not allowed"):
        check_name("dataset", bad)


def test_good_names_and_run_ids():
    assert check_name("dataset", "photos-2026_v1.2") == "photos-2026_v1.2"
    assert check_name("run id", new_run_id())
    with pytest.raises(ValueError, match="dataset '../../etc' is not allowed"):
        Lake.shard_path("embeddings", "../../etc", MODEL, "r1", "00000")


def test_commit_makes_shards_visible_and_readable_by_duckdb(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    staged = stage(lake, run, "00000", ["a.jpg", "b.jpg", "c.jpg"], bad=["d.jpg"])
    assert lake.committed_files("embeddings") == []  # staged is not visible
    stats = Committer(lake).commit(staged)
    assert stats.rows == {"embeddings": 3, "patches": 3, "errors": 1} and stats.duplicates == 0
    assert lake.list_files("_staging") == [] and lake.list_files("_commits", ".json") == []
    assert lake.committed_files("embeddings") == [
        f"embeddings/model={MODEL}/dataset={DATASET}/{run}-00000.parquet"
    ]
    con = duck(tmp_path)
    glob = f"{lake.base}/embeddings/**/*.parquet"
    rows = con.execute(
        f"SELECT model, dataset, uri, "
        f"array_cosine_similarity(embedding::FLOAT[{DIM}], embedding::FLOAT[{DIM}])"
        f" FROM read_parquet('{glob}', hive_partitioning=true) ORDER BY uri"
    ).fetchall()
    assert [r[:3] for r in rows] == [(MODEL, DATASET, u) for u in ["a.jpg", "b.jpg", "c.jpg"]]
    assert all(abs(r[3] - 1.0) < 1e-6 for r in rows)
    tokens = con.execute(
        f"SELECT grid_h * grid_w, len(tokens), len(tokens[1]) "
        f"FROM read_parquet('{lake.base}/patches/**/*.parquet', hive_partitioning=true) LIMIT 1"
    ).fetchone()
    assert tokens == (6, 6, DIM)
    err = con.execute(
        f"SELECT dataset, uri, stage FROM read_parquet('{lake.base}/errors/**/*.parquet', "
        "hive_partitioning=true)"
    ).fetchall()
    assert err == [(DATASET, "d.jpg", "decode")]


def test_the_same_batch_twice_leaves_one_row_per_key(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    committer = Committer(lake)
    committer.commit(stage(lake, run, "00000", ["a.jpg", "b.jpg"]))
    again = committer.commit(stage(lake, run, "00001", ["b.jpg", "a.jpg", "c.jpg", "c.jpg"]))
    assert again.rows == {"embeddings": 1, "patches": 1} and again.duplicates == 6
    assert count_rows(duck(tmp_path), lake, "embeddings") == 3
    assert count_rows(duck(tmp_path), lake, "patches") == 3
    # a later run (fresh committer, state from the committed Parquet) drops them too
    late = Committer(lake).commit(stage(lake, new_run_id(), "00000", ["a.jpg", "c.jpg"]))
    assert late.rows == {} and late.duplicates == 4
    assert lake.list_files("_staging") == []


def test_one_input_failing_for_two_models_keeps_both_error_rows(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    both = pa.concat_tables([errors(["x.png"], run, "embed", m) for m in ("dinov2", MODEL)])
    stats = Committer(lake).commit(stage_shard(lake, run, "00000", DATASET, {("errors", None): both}))
    assert stats.rows == {"errors": 2} and stats.duplicates == 0
    again = Committer(lake).commit(stage_shard(lake, run, "00001", DATASET, {("errors", None): both}))
    assert again.rows == {"errors": 2}  # error rows are events: a later attempt records its own


class Crash(RuntimeError):
    pass


def crash_after_moves(lake: Lake, n: int):
    """Make lake.move raise after N successful moves (a process dying mid-commit)."""
    real, calls = lake.move, []

    def move(src, dst):
        if len(calls) >= n:
            raise Crash("killed")
        calls.append(dst)
        real(src, dst)

    lake.move = move
    return lambda: setattr(lake, "move", real)


def test_a_group_of_shards_commits_as_one_with_one_vector_merge(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    merges: list[list[str]] = []
    committer = Committer(lake, lambda model, dataset, table: merges.append(table["uri"].to_pylist()))
    committer.commit(stage(lake, run, "00000", ["a.jpg"]))
    group = [
        stage(lake, run, "00001", ["b.jpg", "c.jpg"], bad=["x.jpg"]),
        stage(lake, run, "00002", ["c.jpg", "a.jpg"]),  # c: earlier in this group; a: committed before
        stage(lake, run, "00003", ["d.jpg"]),
    ]
    stats = committer.commit_group(group)
    assert stats.rows == {"embeddings": 3, "patches": 3, "errors": 1} and stats.duplicates == 4
    assert stats.shards == ["00001", "00003"]  # 00002 held nothing new
    assert merges == [["a.jpg"], ["b.jpg", "c.jpg", "d.jpg"]]  # one merge for the group's partition
    assert lake.list_files("_staging") == [] and lake.list_files("_commits", ".json") == []
    got = duck(tmp_path).execute(
        f"SELECT uri, count(*) FROM read_parquet('{lake.base}/embeddings/**/*.parquet') "
        "GROUP BY uri ORDER BY uri"
    ).fetchall()
    assert got == [(u, 1) for u in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]]


def test_a_group_commit_that_crashed_after_its_record_resumes_on_retry(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    committer = Committer(lake)
    group = [stage(lake, run, f"{k:05d}", [f"{k}-{i}.jpg" for i in range(3)]) for k in range(3)]
    restore = crash_after_moves(lake, 2)  # 2 of the group's 6 files moved, then the process "dies"
    with pytest.raises(Crash):
        committer.commit_group(group)
    restore()
    assert lake.exists(commit_record_path(run, "00000"))  # one record, named after the first shard
    again = committer.commit_group(group)  # what Prefect's retry of the commit task does
    assert again.resumed and again.shards == ["00000", "00001", "00002"]
    con = duck(tmp_path)
    assert count_rows(con, lake, "embeddings") == 9 and count_rows(con, lake, "patches") == 9
    assert lake.list_files("_staging") == [] and lake.list_files("_commits", ".json") == []


@pytest.mark.parametrize("crash_at", ["first_move", "second_move", "vector_merge"])
def test_crash_after_k_of_n_shards_then_rerun_is_exactly_once(tmp_path, crash_at):
    lake = Lake(str(tmp_path / "lake"))
    inputs = [f"img{i:02d}.jpg" for i in range(20)]
    shards = [inputs[i : i + 4] for i in range(0, 20, 4)]
    merged: dict[str, list[str]] = {}
    fail_merge = []

    def on_embeddings(model, dataset, table):
        if fail_merge:
            raise Crash("killed during the vector merge")
        merged.setdefault(model, []).extend(table["image_id"].to_pylist())

    run1 = new_run_id()
    committer = Committer(lake, on_embeddings)
    for k in range(2):
        committer.commit(stage(lake, run1, f"{k:05d}", shards[k]))
    staged = stage(lake, run1, "00002", shards[2])
    stage(lake, run1, "00003", shards[3])  # staged, never committed: an orphan
    restore = crash_after_moves(lake, {"first_move": 0, "second_move": 1, "vector_merge": 2}[crash_at])
    fail_merge.append(crash_at == "vector_merge")
    with pytest.raises(Crash):
        committer.commit(staged)
    restore()
    fail_merge.clear()
    assert lake.exists(commit_record_path(run1, "00002"))

    # a reader in between never sees a partial shard: every visible file reads whole
    con = duck(tmp_path)
    assert count_rows(con, lake, "embeddings") in (8, 12)

    report = recover(lake, on_embeddings)
    assert report.rolled_forward == 1 and report.orphans_removed == 2
    assert lake.list_files("_staging") == [] and lake.list_files("_commits", ".json") == []

    run2 = new_run_id()
    done = Ledger(lake).done_keys(DATASET, MODEL, "rev1", "pp1")
    todo = [u for u in inputs if key(u) not in done]
    assert len(todo) == 8
    committer = Committer(lake, on_embeddings)
    for k, chunk in enumerate([todo[:4], todo[4:], shards[0]]):  # shards[0] again: already committed
        committer.commit(stage(lake, run2, f"{k:05d}", chunk))
    got = con.execute(
        f"SELECT uri, count(*) FROM read_parquet('{lake.base}/embeddings/**/*.parquet', "
        "hive_partitioning=true) GROUP BY uri ORDER BY uri"
    ).fetchall()
    assert got == [(u, 1) for u in inputs]
    assert count_rows(con, lake, "patches") == 20
    assert sorted(set(merged[MODEL])) == sorted(set(embeddings(inputs, run2)["image_id"].to_pylist()))


def test_decode_failures_that_may_pass_later_are_retried_by_the_next_run(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    reasons = ("timeout", "out_of_memory", "corrupt")
    tables = {("errors", None): pa.concat_tables([errors([f"{r}.jpg"], run, error_type=r) for r in reasons])}
    Committer(lake).commit(stage_shard(lake, run, "00000", DATASET, tables))
    assert {k.split("\x1f")[0] for k in Ledger(lake).failed_keys(DATASET)} == {"corrupt.jpg"}


def test_ledger_keys_follow_revision_version_and_error_stage(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    staged = stage_shard(
        lake, run, "00000", DATASET,
        {("embeddings", MODEL): embeddings(["a.jpg"], run),
         ("errors", None): errors(["bad.jpg"], run)},
    )  # fmt: skip
    Committer(lake).commit(staged)
    Committer(lake).commit(
        stage_shard(lake, run, "00001", DATASET, {("errors", None): errors(["gone.jpg"], run, "read")})
    )
    ledger = Ledger(lake)
    assert ledger.done_keys(DATASET, MODEL, "rev1", "pp1") == {key("a.jpg")}
    assert ledger.done_keys(DATASET, MODEL, "rev2", "pp1") == set()  # new model revision: re-embed
    assert ledger.done_keys(DATASET, MODEL, "rev1", "pp2") == set()  # new preprocessing: re-embed
    assert ledger.done_keys("other", MODEL, "rev1", "pp1") == set()
    assert ledger.failed_keys(DATASET) == {"bad.jpg\x1f7\x1fv1"}  # read failures are retried


def test_manifest_round_trip_redacts_credentials(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    m = RunManifest(run, "s3://AKIAEXAMPLE:sekrit@bucket/photos", DATASET,
                    [EncoderRecord(MODEL, "rev1", "pp1", {"max_pixels": 1000}, 48, "float16")])  # fmt: skip
    write_manifest(lake, m)
    m.counts = {"listed": 3, "embedded": 2, "errors": 1}
    m.finish("succeeded")
    write_manifest(lake, m)
    back = read_manifest(lake, run)
    assert back.source == "s3://bucket/photos" and back.status == "succeeded"
    assert back.encoders[0].preprocess_config == {"max_pixels": 1000}
    assert [r.run_id for r in list_manifests(lake)] == [run]
    assert "sekrit" not in (tmp_path / "lake" / "_runs" / f"{run}.json").read_text()


def test_lake_on_s3(s3, tmp_path):
    import s3fs

    bucket, options = s3
    lake = Lake(f"s3://{bucket}/lake", options)
    run = new_run_id()
    Committer(lake).commit(
        stage(lake, run, "00000", ["s3://src/a.jpg", "s3://src/b.jpg"], bad=["s3://src/c.jpg"])
    )
    Committer(lake).commit(stage(lake, run, "00001", ["s3://src/b.jpg"]))
    assert lake.committed_files("embeddings") == [
        f"embeddings/model={MODEL}/dataset={DATASET}/{run}-00000.parquet"
    ]
    assert lake.list_files("_staging") == []
    con = duck(tmp_path)
    con.register_filesystem(s3fs.S3FileSystem(**options))
    rows = con.execute(
        f"SELECT model, dataset, count(*) FROM read_parquet('s3://{bucket}/lake/embeddings/**/*.parquet', "
        "hive_partitioning=true) GROUP BY ALL"
    ).fetchall()
    assert rows == [(MODEL, DATASET, 2)]
    assert Ledger(lake).failed_keys(DATASET) == {"s3://src/c.jpg\x1f7\x1fv1"}


def test_staged_shard_of_nothing_commits_nothing(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    assert Committer(lake).commit(StagedShard("r1", "00000", {})).rows == {}
    assert lake.list_files("_commits", ".json") == []


def test_a_failed_commit_retried_resumes(tmp_path):
    """A commit that died after its intent (e.g. S3 503 on a move) is finished by the retry."""
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    committer = Committer(lake)
    staged = stage(lake, run, "00000", ["a.jpg", "b.jpg"])
    restore = crash_after_moves(lake, 1)
    with pytest.raises(Crash):
        committer.commit(staged)
    restore()
    assert committer.commit(staged).resumed
    assert (
        count_rows(duck(tmp_path), lake, "embeddings") == 2
        and count_rows(duck(tmp_path), lake, "patches") == 2
    )
    assert committer.commit(stage(lake, run, "00001", ["a.jpg"])).duplicates == 2


def test_crash_and_rerun_keep_parquet_and_lancedb_in_agreement(tmp_path):
    """The same crash, with the real LanceDB table as the vector side of the commit."""
    import pyarrow as pa

    from storage.vectors import VectorTable

    lake = Lake(str(tmp_path / "lake"))
    table = VectorTable.open(str(tmp_path / "lake"), MODEL, DIM)
    dying = []

    def merge(model, dataset, rows):
        if dying:
            raise Crash("killed before the vector merge")
        table.merge(rows.append_column("dataset", pa.array([dataset] * rows.num_rows)))

    inputs = [f"img{i:02d}.jpg" for i in range(12)]
    run1 = new_run_id()
    committer = Committer(lake, merge)
    committer.commit(stage(lake, run1, "00000", inputs[:4]))
    staged = stage(lake, run1, "00001", inputs[4:8])
    restore = crash_after_moves(lake, 2)  # both files moved, then death before the vector merge
    dying.append(True)
    with pytest.raises(Crash):
        committer.commit(staged)
    restore()
    dying.clear()
    assert table.count() == 4  # Parquet is ahead of LanceDB until recovery
    recover(lake, merge)
    assert table.count() == 8
    run2 = new_run_id()
    done = Ledger(lake).done_keys(DATASET, MODEL, "rev1", "pp1")
    Committer(lake, merge).commit(stage(lake, run2, "00000", [u for u in inputs if key(u) not in done]))
    parquet_ids = (
        duck(tmp_path)
        .execute(
            f"SELECT image_id FROM read_parquet('{lake.base}/embeddings/**/*.parquet', "
            "hive_partitioning=true) ORDER BY image_id"
        )
        .fetchall()
    )
    lance_ids = sorted(table.table.to_arrow()["image_id"].to_pylist())
    assert [r[0] for r in parquet_ids] == lance_ids and len(lance_ids) == 12


def test_recovery_removes_a_dead_intent_writes_temp_file_and_marks_dead_runs_abandoned(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    dead, done, me = new_run_id(), new_run_id(), new_run_id()
    lake.write_bytes(f"{commit_record_path(dead, '00000')}.tmp-1a2b", b'{"run_id": "')  # killed mid-write
    for run_id, status in ((dead, "running"), (done, "succeeded"), (me, "running")):
        manifest = RunManifest(run_id, "/src", DATASET)
        manifest.status = status
        write_manifest(lake, manifest)
    assert recover(lake).orphans_removed == 1 and lake.list_files("_commits", suffix="") == []
    assert abandon_dead_runs(lake, keep_run=me) == [dead]
    assert {m.run_id: m.status for m in list_manifests(lake)} == {
        dead: "abandoned", done: "succeeded", me: "running"}  # fmt: skip
