"""S3 faults: SOURCE and LAKE on S3 behind a proxy that fails 10% of requests (503 SlowDown, 500,
connection resets before and after moto executed the request, truncated bodies). The run must finish
with nothing lost or doubled; a 403 AccessDenied must fail fast, in one line, without a retry storm.

The driver, the Ray workers and LanceDB's Rust object store all reach S3 through the proxy; the checks
read the lake directly from moto (DuckDB with an s3fs filesystem, LanceDB), never through the proxy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest
import s3fs
from _s3_proxy import FAULTS, FaultProxy
from _support import run_cli

from flows.demo import make_corpus
from flows.embed import embed_corpus
from storage.lake import AccessDenied, Lake
from storage.lock import LakeLock
from storage.vectors import VectorTable

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 60
MODEL = "qwen2_5_vl"
MAX_DENIED = 8  # requests a denied client may make before it gives up: a handful, not a retry storm


@pytest.fixture
def proxy(s3_server):
    """The fault proxy in front of moto, 10% of requests failing (seeded)."""
    with FaultProxy(s3_server, rate=0.1, seed=7).running() as p:
        yield p


def upload_corpus(bucket: str, direct: dict, root: Path, n: int = N_IMAGES) -> list[str]:
    """N images + 2 broken files under s3://BUCKET/photos, written straight to moto."""
    fs = s3fs.S3FileSystem(**direct)
    names = []
    for f in make_corpus(root, n, seed=11):
        fs.put_file(str(f), f"{bucket}/photos/{f.name}")
        names.append(f.name)
    return names


def area(path: str) -> str:
    """Which part of the system a request served: photos, lake/lance, lake/_staging, lake/embeddings ..."""
    parts = path.strip("/").split("/")
    return "/".join(parts[1:3]) if parts[1:2] == ["lake"] else (parts[1] if len(parts) > 1 else "bucket")


def duck(tmp_path: Path, direct: dict) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(f"SET extension_directory = '{tmp_path / 'duckdb-ext'}'")
    con.register_filesystem(s3fs.S3FileSystem(skip_instance_cache=True, **direct))
    return con


def test_proxy_forwards_multipart_uploads_and_range_reads(s3, s3_server):
    """The proxy itself: bodies pass through whole (multipart parts, Range GETs); a body cut mid-way is
    retried by s3fs, a denied key answers 403 without reaching moto."""
    bucket, direct = s3
    data = os.urandom(11 * 2**20 + 5)
    with FaultProxy(s3_server, rate=0.0).running() as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True)
        with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * 2**20) as f:  # 3 parts
            f.write(data)
        assert {e.method for e in proxy.events} >= {"POST", "PUT"}
        start = 7 * 2**20
        assert fs.cat_file(f"{bucket}/big.bin", start=start, end=start + 100) == data[start : start + 100]
        proxy.fail_next("GET", f"/{bucket}/big.bin", "truncate")
        assert fs.cat_file(f"{bucket}/big.bin") == data
        assert proxy.counts()["truncate"] == 1
        proxy.deny(bucket, "secret/")
        with pytest.raises(PermissionError):
            fs.cat_file(f"{bucket}/secret/x")
    assert s3fs.S3FileSystem(**direct).cat_file(f"{bucket}/big.bin") == data


@pytest.mark.usefixtures("ray_local", "prefect_harness")
def test_ten_percent_faults_lose_nothing(s3, proxy, checkpoint, tmp_path):
    bucket, direct = s3
    names = upload_corpus(bucket, direct, tmp_path / "images")
    via_proxy = {"endpoint_url": proxy.url}
    lake = f"s3://{bucket}/lake"
    # Group commit leaves LanceDB ~10 requests a run: a 10% draw misses them all a third of the time, so
    # one fault is scripted on each kind of Lance write (retried by its object store: none reached moto).
    dataset = f"/{bucket}/lake/lance/{MODEL}.lance"
    for part, fault in (("data/", "slowdown"), ("_transactions/", "internal"), ("_versions/", "reset")):
        proxy.fail_next("PUT", f"{dataset}/{part}", fault)
    t0 = time.monotonic()
    summary = embed_corpus(
        source=f"s3://{bucket}/photos", out=lake, model=MODEL, weights=str(checkpoint(MODEL)), actors=1,
        batch_images=8, quiet=True, source_options=via_proxy, lake_options=via_proxy,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    counts = proxy.counts()
    hit = Counter(area(e.path) for e in proxy.events if e.outcome != "ok")
    print(f"run {seconds:.1f} s; proxy saw {sum(counts.values())} requests: {dict(counts)}; faults by area: "
          f"{dict(hit)}")  # fmt: skip

    assert summary["status"] == "succeeded"
    assert proxy.injected() >= 20 and all(counts[f] for f in FAULTS), counts
    assert all(hit[a] for a in ("photos", "lake/_staging")), hit  # workers and driver, drawn at random
    lance = Counter(e.path.split("/")[5] for e in proxy.events if e.outcome != "ok" and dataset in e.path)
    assert all(lance[p] for p in ("data", "_transactions", "_versions")), lance  # the scripted ones, at least
    c = summary["counts"]
    assert c["listed"] == N_IMAGES + 2 and c["embedded"] == N_IMAGES and c["errors"] == 2, c
    assert summary["errors_by_reason"] == {"decode/not_an_image": 1, "decode/truncated": 1}

    con = duck(tmp_path, direct)
    emb = f"read_parquet('{lake}/embeddings/**/*.parquet', hive_partitioning=true)"
    rows = con.execute(f"SELECT uri, image_id FROM {emb}").fetchall()
    good = {f"{lake.removesuffix('/lake')}/photos/{n}" for n in names if not n.startswith("broken")}
    assert len(rows) == N_IMAGES and {u for u, _ in rows} == good  # every input exactly once
    errors = con.execute(
        f"SELECT uri, stage FROM read_parquet('{lake}/errors/**/*.parquet', hive_partitioning=true)"
    ).fetchall()
    assert sorted((os.path.basename(u), s) for u, s in errors) == [
        ("broken-not-an-image.png", "decode"), ("broken-truncated.jpg", "decode")]  # fmt: skip
    patches = f"read_parquet('{lake}/patches/**/*.parquet', hive_partitioning=true)"
    assert con.execute(f"SELECT count(*), count(DISTINCT image_id) FROM {patches}").fetchone() == (
        N_IMAGES, N_IMAGES)  # fmt: skip

    dim = con.execute(f"SELECT len(embedding) FROM {emb} LIMIT 1").fetchone()[0]
    table = VectorTable.open(lake, MODEL, dim, direct)
    ids = table.table.to_arrow()["image_id"].to_pylist()
    assert sorted(ids) == sorted(i for _, i in rows) and len(set(ids)) == N_IMAGES
    fs = s3fs.S3FileSystem(**direct)
    leftovers = [p for d in ("_staging", "_commits") for p in fs.find(f"{bucket}/lake/{d}")]
    assert leftovers == []


def denied_since_first(proxy: FaultProxy) -> tuple[int, float | None]:
    """(denied requests, time.monotonic() of the first one)."""
    denied = [e.at for e in proxy.events if e.outcome == "denied"]
    return len(denied), (denied[0] if denied else None)


@pytest.mark.usefixtures("prefect_harness")
def test_access_denied_is_not_retried(s3, s3_server, checkpoint, tmp_path):
    """LAKE/lance denied: the run stops at its first LanceDB call, once, without Prefect retries."""
    bucket, direct = s3
    upload_corpus(bucket, direct, tmp_path / "images", n=4)
    with FaultProxy(s3_server, rate=0.0).running() as proxy:
        proxy.deny(bucket, "lake/lance/")
        via_proxy = {"endpoint_url": proxy.url}
        with pytest.raises(AccessDenied) as failure:
            embed_corpus(
                source=f"s3://{bucket}/photos", out=f"s3://{bucket}/lake", model=MODEL,
                weights=str(checkpoint(MODEL)), quiet=True, source_options=via_proxy, lake_options=via_proxy,
            )  # fmt: skip
        ended = time.monotonic()
    denied, first = denied_since_first(proxy)
    print(f"denied {denied} requests; failed {ended - first:.1f} s after the first")
    assert f"s3://{bucket}/lake/lance/{MODEL}" in str(failure.value) and "access denied" in str(failure.value)
    assert 1 <= denied <= MAX_DENIED and ended - first < 10


@pytest.mark.parametrize(
    "denied_prefix",
    [
        pytest.param("lake/", id="lake"),
        pytest.param("", id="everything"),
    ],
)  # fmt: skip
def test_cli_access_denied_up_front_is_one_line(s3, s3_server, checkpoint, tmp_path, capsys, denied_prefix):
    """Credentials denied on the lake (or the whole bucket): the CLI's checks stop before any work."""
    bucket, direct = s3
    upload_corpus(bucket, direct, tmp_path / "images", n=1)
    with FaultProxy(s3_server, rate=0.0).running() as proxy:
        proxy.deny(bucket, denied_prefix)
        rc, _, errors = run_cli(
            ["embed", f"s3://{bucket}/photos", "--out", f"s3://{bucket}/lake", "--weights", checkpoint(MODEL),
             "--quiet", "--storage-option", f"endpoint_url={proxy.url}"], capsys,
        )  # fmt: skip
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("towerflow: error:"), errors
    url = f"s3://{bucket}/{denied_prefix or 'photos'}".rstrip("/")
    assert "access denied" in errors[0] and url in errors[0], errors
    assert 1 <= proxy.counts()["denied"] <= 2


def test_cli_access_denied_mid_run_is_one_line(s3, s3_server, checkpoint, tmp_path):
    """Read-only credentials for the lake's staging area: the Ray workers' first shard write is refused,
    and `towerflow embed` exits 2 with one line naming access denied and the URL: no traceback, no
    secrets, no retry storm."""
    bucket, direct = s3
    upload_corpus(bucket, direct, tmp_path / "images", n=6)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-sub"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)  # the child starts its own temporary API, as a user's shell would
    with FaultProxy(s3_server, rate=0.0).running() as proxy:
        proxy.deny(bucket, "lake/_staging/", methods=("PUT", "POST"))
        proc = subprocess.run(
            [sys.executable, "-m", "flows.embed", f"s3://{bucket}/photos", "--out", f"s3://{bucket}/lake",
             "--weights", str(checkpoint(MODEL)), "--actors", "1", "--batch-images", "4", "--quiet",
             "--storage-option", f"endpoint_url={proxy.url}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        ended = time.monotonic()
    output = proc.stdout + proc.stderr
    denied, first = denied_since_first(proxy)
    took = ended - (first or ended)
    print(f"exit {proc.returncode}; {denied} denied; ended {took:.1f} s after the first\n{proc.stderr}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("towerflow: error:")]
    assert proc.returncode == 2 and len(errors) == 1, output[-3000:]
    assert "access denied" in errors[0] and f"s3://{bucket}/lake/_staging/" in errors[0]
    assert "Traceback" not in output
    assert not [k for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID") if os.environ[k] in output]
    assert 1 <= denied <= MAX_DENIED and ended - first < 30


def test_lock_whose_create_response_was_lost_is_still_ours(s3, s3_server):
    bucket, _ = s3
    with FaultProxy(s3_server, rate=0.0).running() as proxy:
        proxy.fail_next("PUT", f"/{bucket}/lake/_lock/", "reset_after")
        lock = LakeLock(Lake(f"s3://{bucket}/lake", {"endpoint_url": proxy.url}), "run-a").acquire(0)
        lock.release()
    assert proxy.counts()["reset_after"] == 1


def test_a_source_object_denied_to_the_decode_task_fails_the_task_not_one_row(s3, s3_server, tmp_path):
    """403 on reading an image is about the run's credentials, not that file: the decode task raises
    (the run then fails in one line) instead of writing a read-error row for every image."""
    import pyarrow as pa

    from storage.lake import is_access_denied
    from tasks.decode import INPUT_SCHEMA, decode_batch

    bucket, direct = s3
    names = upload_corpus(bucket, direct, tmp_path / "images", n=2)
    with FaultProxy(s3_server, rate=0.0).running() as proxy:
        proxy.deny(bucket, "photos/", methods=("GET",))
        rows = [{"uri": f"s3://{bucket}/photos/{n}", "size_bytes": 1, "source_version": "v", "models": []}
                for n in names]  # fmt: skip
        with pytest.raises(Exception) as err:
            decode_batch(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), models=[],
                         source_options={"endpoint_url": proxy.url})  # fmt: skip
    assert is_access_denied(err.value) and f"s3://{bucket}/photos/" in str(err.value)
