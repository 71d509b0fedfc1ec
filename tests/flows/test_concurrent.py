"""Two writers on one lake: the second `towerflow embed` refuses (exit 75) or waits its turn."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import lancedb
import pytest

from flows.cli_embed import LOCKED_EXIT
from flows.demo import make_corpus
from storage.lock import LOCK_PATH

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]
N = 40  # good images per corpus; make_corpus adds two broken files


def _embed(tmp_path: Path, ray_local, source: Path, lake: Path, weights: Path, *extra: str):
    """`towerflow embed` as its own process (own Prefect API), joining the test's Ray cluster."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / f"prefect-{time.monotonic_ns()}"),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "embed", str(source), "--out", str(lake), "--model", "dinov2",
            "--weights", str(weights), "--actors", "1", "--batch-images", "8", "--quiet", *extra]  # fmt: skip
    pipe = subprocess.PIPE
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=pipe, stderr=pipe, text=True)


def _when_locked(lake: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (lake / LOCK_PATH).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run never took the lake lock"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"embed did not finish:\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, err


def _parquet_counts(lake: Path) -> dict[str, tuple[int, int]]:
    rows = duckdb.connect().execute(
        f"SELECT dataset, count(*), count(DISTINCT uri) FROM read_parquet('{lake}/embeddings/**/*.parquet', "
        "hive_partitioning=true) GROUP BY dataset"
    ).fetchall()
    return {d: (n, distinct) for d, n, distinct in rows}


def _lance_ids(lake: Path) -> list[str]:
    table = lancedb.connect(str(lake / "lance")).open_table("dinov2")
    return table.to_arrow().column("image_id").to_pylist()


def _hold_lock(lake: Path, until: Path) -> subprocess.Popen:
    """Another process holding the lake's writer lock, exactly as a run does, until UNTIL exists (a
    real run finishes on its own schedule, which would make 'the second run arrives while the first
    is busy' a race)."""
    code = ("import sys, time, pathlib\nfrom storage.lake import Lake\nfrom storage.lock import LakeLock\n"
            "lock = LakeLock(Lake(sys.argv[1]), 'busy-run').acquire()\nprint('locked', flush=True)\n"
            "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.05)\nlock.release()\n")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(lake), str(until)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_busy_lake_refuses_with_one_line_and_loses_nothing(checkpoint, ray_local, tmp_path):
    source, lake, done = tmp_path / "images", tmp_path / "lake", tmp_path / "done"
    make_corpus(source, N, seed=11)
    weights = checkpoint("dinov2")
    holder = _hold_lock(lake, done)
    second = _embed(tmp_path, ray_local, source, lake, weights)
    code, err = _finish(second, timeout=120)
    done.touch()
    assert holder.wait(timeout=30) == 0
    assert code == LOCKED_EXIT, err
    lines = [ln for ln in err.splitlines() if ln.startswith("towerflow: error:")]
    assert len(lines) == 1 and "being written by run busy-run" in lines[0] and "--wait-lock" in lines[0], err
    assert "Traceback" not in err
    assert not (lake / "embeddings").exists()  # it refused before doing anything
    assert _finish(_embed(tmp_path, ray_local, source, lake, weights))[0] == 0  # the lock is free again
    assert _parquet_counts(lake) == {"default": (N, N)}
    ids = _lance_ids(lake)
    assert len(ids) == len(set(ids)) == N
    assert not (lake / LOCK_PATH).exists()


def test_a_waiting_run_on_another_dataset_merges_after_the_first(checkpoint, ray_local, tmp_path):
    lake, weights = tmp_path / "lake", checkpoint("dinov2")
    make_corpus(tmp_path / "a", N, seed=21)
    make_corpus(tmp_path / "b", N, seed=22)
    first = _embed(tmp_path, ray_local, tmp_path / "a", lake, weights, "--dataset", "a")
    _when_locked(lake, first)
    waits = ("--dataset", "b", "--wait-lock", "600")
    second = _embed(tmp_path, ray_local, tmp_path / "b", lake, weights, *waits)
    assert _finish(first)[0] == 0
    code, err = _finish(second)
    assert code == 0, err
    assert _parquet_counts(lake) == {"a": (N, N), "b": (N, N)}
    ids = _lance_ids(lake)
    assert len(ids) == len(set(ids)) == 2 * N
    assert not (lake / LOCK_PATH).exists()
