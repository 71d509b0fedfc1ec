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
from tasks.faults import Fault, fired

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("ray_local", "prefect_harness")
def test_sigint_mid_run_then_rerun_is_exactly_once(checkpoint, tmp_path):
    source, lake = tmp_path / "images", tmp_path / "lake"
    make_corpus(source, 160, seed=5)
    weights = checkpoint("qwen2_5_vl")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-sub"),
        "PYTHONUNBUFFERED": "1",
        # the actor stalls on its 15th of 20 batches, and the signal waits for that stall and a
        # committed shard: a tiny tower on 160 small images otherwise ends within a second or two of
        # its first commit (an interrupt could land after the work was done), and a first shard can
        # be committed before the actor reaches the stall (a CI run saw that race)
        "TOWERFLOW_FAULT": "embed@15:stall",
        "TOWERFLOW_FAULT_DIR": str(tmp_path),
    }
    env.pop("PREFECT_API_URL", None)  # the child starts its own temporary API, as a user's shell would
    env.pop("RAY_AUTH_MODE", None)  # as a user's shell: Ray turns token auth on, writing ~/.ray/auth_token
    env["HOME"] = str(tmp_path / "home")
    # a shell starts a background job (`make test &`) with SIGINT ignored, and an ignored signal stays
    # ignored across exec: the child gets the disposition of a foreground command, whose Ctrl-C counts
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.embed", str(source), "--out", str(lake), "--weights", str(weights),
             "--actors", "1", "--batch-images", "8", "--quiet"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a timeout ends the Ray it started too
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 240
    shards = lake / "embeddings" / "model=qwen2_5_vl" / "dataset=default"
    stall = Fault("embed", 15, "stall")

    def mid_run() -> bool:  # the actor is stalled and earlier shards are visible: the run is surely going
        return fired(tmp_path, stall) is not None and any(shards.glob("*.parquet"))

    while time.monotonic() < deadline and proc.poll() is None and not mid_run():
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()  # still running: the interrupt lands mid-run
    assert mid_run()
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes hold the pipe open: end them all
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"embed did not stop within 120 s of SIGINT:\n{out[-3000:]}")
    assert proc.returncode == 130, out[-3000:]  # the CLI's "interrupted" exit
    # --quiet holds under `python -m flows.embed` too (prefect imported first), for Ray's and Ray Data's
    # loggers as well ("\tINFO worker.py:... Started a local Ray instance", "\tINFO streaming_executor.py"),
    # and Ray's per-run "Token authentication is enabled for this Ray cluster" warning
    assert "| INFO" not in out and "\tINFO" not in out and "Progress bars disabled" not in out, out
    assert "Token authentication" not in out, out
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
