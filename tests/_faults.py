"""Kill tests' helpers: `python -m flows.embed` as its own session with fault points, and lake checks.

Run as a script, this module is the driver: it wraps the lake's write steps with `tasks.faults` points,
then runs `flows.embed.main`. The points are wrapped here, in the driver process, not hooked inside
storage, because storage must not import tasks (dependencies point one way):
- `commit.after-intent`: an intent record was just written under _commits/, nothing moved yet;
- `commit.after-move`: a shard's files are in place, its rows not yet merged into LanceDB;
- `lake-op`: before each write, move or removal of a lake file and each LanceDB merge (recovery,
  manifests and commits alike): `lake-op@K` dies between the (K-1)-th and the K-th storage step.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import lancedb
import psutil

REPO = Path(__file__).resolve().parents[1]
KINDS = ("embeddings", "patches", "errors")


def _install_fault_points() -> None:
    from storage.lake import Lake
    from tasks.commit import LakeSession
    from tasks.faults import maybe_fault

    def before(method, point="lake-op"):
        def wrapped(*args, **kwargs):
            maybe_fault(point)
            return method(*args, **kwargs)

        return wrapped

    write_bytes = Lake.write_bytes

    def write_then_fault(self, rel, data):
        write_bytes(self, rel, data)
        if rel.startswith("_commits/"):
            maybe_fault("commit.after-intent")

    Lake.write_bytes = before(write_then_fault)
    Lake.move, Lake.remove = before(Lake.move), before(Lake.remove)
    LakeSession.merge_vectors = before(before(LakeSession.merge_vectors, "commit.after-move"))


@dataclass
class Child:
    """One `flows.embed` process, leader of its own session: killing the session ends its local Ray too."""

    proc: subprocess.Popen
    log: Path
    ray_tmp: str

    def output(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def killpg(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killpg()
            self.proc.wait()
            raise AssertionError(f"embed did not end within {timeout} s:\n{self.output()}") from None

    def reap(self, timeout: float = 60) -> list[str]:
        """Kill what is left of the session, wait until none of it runs; returns what had to be killed.

        Ray workers leave the driver's process group but keep its session; they exit by themselves
        once their raylet is gone. What still runs at the deadline is killed and reported.
        """
        self.killpg()
        self.proc.wait()
        deadline = time.monotonic() + timeout
        while (left := session_processes(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in left:
            p.kill()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return [f"{p.pid} {p.info['name']}" for p in left]


def session_processes(sid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of session SID."""
    out = []
    for p in psutil.process_iter(["name", "status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue  # gone, or not ours: not part of the session
    return out


def start_embed(tmp: Path, source: Path, lake: Path, weights: Path, *, fault: str = "", api_url: str,
                model: str = "qwen2_5_vl", batch_images: int = 8) -> Child:  # fmt: skip
    """Start the driver with TOWERFLOW_FAULT=FAULT (fault markers in TMP/faults), its own local Ray
    (a short private RAY_TMPDIR, so it can join no other cluster) and the test's Prefect API."""
    (tmp / "faults").mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="tfk-")  # Ray's socket paths must stay short
    env = {**os.environ, "TOWERFLOW_FAULT": fault, "TOWERFLOW_FAULT_DIR": str(tmp / "faults"),
           "RAY_TMPDIR": ray_tmp, "PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log = tmp / f"embed-{time.monotonic_ns()}.log"
    argv = [sys.executable, __file__, str(source), "--out", str(lake), "--model", model, "--weights",
            str(weights), "--actors", "1", "--batch-images", str(batch_images), "--quiet"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    return Child(proc, log, ray_tmp)


@dataclass
class LakeState:
    """What readers see: visible Parquet rows per kind, LanceDB ids, leftovers of the commit protocol."""

    rows: dict[str, int]
    embedded_ids: set[str]
    embedded_uris: set[str]
    error_uris: set[str]
    lance_ids: set[str]
    staging: list[str]
    intents: list[str]


def _parquet(lake: Path, kind: str) -> str:
    return f"read_parquet('{lake}/{kind}/**/*.parquet', hive_partitioning=true)"


def check_lake(lake: Path, model: str) -> LakeState:
    """Assert what must hold whenever the driver dies: every visible file reads whole, no input twice
    in Parquet or LanceDB, and LanceDB never ahead of Parquet. Returns the state for finer checks."""
    con = duckdb.connect()
    rows, ids, uris, errors = {}, set(), set(), set()
    for kind in KINDS:
        if not any((lake / kind).rglob("*.parquet")):
            rows[kind] = 0
            continue
        key = {"embeddings": "uri", "patches": "image_id",
               "errors": "uri || '/' || stage || '/' || coalesce(model, '')"}[kind]  # fmt: skip
        sql = f"SELECT count(*), count(DISTINCT {key}) FROM {_parquet(lake, kind)}"
        n, distinct = con.execute(sql).fetchone()
        assert n == distinct, f"{kind}: {n} rows but {distinct} distinct {key}"
        rows[kind] = n
    if rows["embeddings"]:
        got = con.execute(f"SELECT image_id, uri FROM {_parquet(lake, 'embeddings')}").fetchall()
        ids, uris = {i for i, _ in got}, {u for _, u in got}
    if rows["errors"]:
        errors = {u for (u,) in con.execute(f"SELECT uri FROM {_parquet(lake, 'errors')}").fetchall()}
    lance: list[str] = []
    db = lancedb.connect(str(lake / "lance"))
    if model in db.list_tables().tables:
        lance = db.open_table(model).to_arrow().column("image_id").to_pylist()
    assert len(lance) == len(set(lance)), f"LanceDB holds {len(lance) - len(set(lance))} duplicate image_ids"
    assert set(lance) <= ids, f"{len(set(lance) - ids)} LanceDB rows have no committed Parquet row"
    staging = sorted(str(p.relative_to(lake)) for p in (lake / "_staging").rglob("*") if p.is_file())
    intents = sorted(str(p.relative_to(lake)) for p in (lake / "_commits").rglob("*") if p.is_file())
    return LakeState(rows, ids, uris, errors, set(lance), staging, intents)


if __name__ == "__main__":
    sys.path[0] = str(REPO)  # the repository, not tests/, as for `python -m flows.embed`
    _install_fault_points()
    from flows.embed import main

    sys.exit(main(sys.argv[1:]))
