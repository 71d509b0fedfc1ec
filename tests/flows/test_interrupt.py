"""Ctrl-C in the middle of `towerflow embed`: the lake stays consistent and a re-run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flows.demo import make_corpus
from flows.embed import embed_corpus

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("ray_local", "prefect_harness")
def test_sigint_mid_run_then_rerun_is_exactly_once(checkpoint, tmp_path):
    source, lake = tmp_path / "images", tmp_path / "lake"
    make_corpus(source, 160, seed=5)
    weights = checkpoint("qwen2_5_vl")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-sub"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)  # the child starts its own temporary API, as a user's shell would
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.embed", str(source), "--out", str(lake), "--weights", str(weights),
         "--actors", "1", "--batch-images", "8", "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    shards = lake / "embeddings" / "model=qwen2_5_vl" / "dataset=default"
    while time.monotonic() < deadline and proc.poll() is None and not any(shards.glob("*.parquet")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()  # still running: the interrupt lands mid-run
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"embed did not stop within 120 s of SIGINT:\n{out[-3000:]}")
    assert proc.returncode != 0
    con = duckdb.connect()
    glob = f"read_parquet('{lake}/embeddings/**/*.parquet', hive_partitioning=true)"
    partial = con.execute(f"SELECT count(*), count(DISTINCT uri) FROM {glob}").fetchone()
    assert partial[0] == partial[1] < 160  # whatever is visible is committed, each input once

    summary = embed_corpus(source=str(source), out=str(lake), model="qwen2_5_vl", weights=str(weights),
                           actors=2, quiet=True)  # fmt: skip
    assert summary["counts"]["skipped_done"] >= partial[0]
    total = con.execute(f"SELECT count(*), count(DISTINCT uri) FROM {glob}").fetchone()
    assert total == (160, 160)
    assert not any((lake / "_staging").rglob("*.parquet")) and not any((lake / "_commits").rglob("*.json"))
