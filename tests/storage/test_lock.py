"""The lake's writer lock: exclusive on local disk and on S3, taken over only from a gone owner."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from storage.lake import Lake
from storage.lock import LOCK_PATH, LakeLock, LakeLockedError, LakeLockLostError


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _plant(lake: Lake, **fields) -> None:
    now = time.time()
    owner = {"run_id": "other-run", "host": "elsewhere", "pid": 1, "pid_started": 0.0, "token": "t0",
             "acquired": now, "heartbeat": now, **fields}  # fmt: skip
    lake.write_bytes(LOCK_PATH, json.dumps(owner).encode())


@pytest.fixture(params=["local", "s3"])
def lake(request, tmp_path):
    if request.param == "local":
        return Lake(str(tmp_path / "lake"))
    bucket, options = request.getfixturevalue("s3")
    return Lake(f"s3://{bucket}/lake", options)


def test_second_writer_is_refused_with_the_owner_named_then_admitted_after_release(lake):
    first = LakeLock(lake, "run-a").acquire()
    with pytest.raises(LakeLockedError, match=r"being written by run run-a \(host .*--wait-lock"):
        LakeLock(lake, "run-b").acquire()
    first.release()
    assert not lake.exists(LOCK_PATH)
    with LakeLock(lake, "run-b").acquire() as second:
        assert second.took_over is None
        assert json.loads(lake.fs.cat_file(lake.path(LOCK_PATH)))["run_id"] == "run-b"


def test_of_many_simultaneous_writers_exactly_one_wins(lake):
    start = threading.Barrier(6)

    def attempt(i: int) -> LakeLock | None:
        start.wait()
        try:
            return LakeLock(lake, f"run-{i}").acquire()
        except LakeLockedError:
            return None

    with ThreadPoolExecutor(6) as pool:
        locks = list(pool.map(attempt, range(6)))
    winners = [lk for lk in locks if lk is not None]
    assert len(winners) == 1
    assert json.loads(lake.fs.cat_file(lake.path(LOCK_PATH)))["run_id"] == winners[0].run_id
    winners[0].release()


def test_a_waiting_writer_gets_the_lock_when_the_owner_finishes(lake):
    first = LakeLock(lake, "run-a").acquire()
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    second = LakeLock(lake, "run-b").acquire(wait_s=30, poll_s=0.2)
    assert 0.9 <= time.monotonic() - t0 < 10
    second.release()


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    _plant(lake, host=socket.gethostname(), pid=dead.pid, pid_started=time.time())
    lock = LakeLock(lake, "run-b").acquire()
    assert lock.took_over and "other-run" in lock.took_over and "exited" in lock.took_over
    lock.release()


def test_a_live_foreign_owner_holds_until_its_heartbeat_expires(lake):
    _plant(lake, heartbeat=time.time())
    with pytest.raises(LakeLockedError, match="other-run"):
        LakeLock(lake, "run-b", ttl_s=60).acquire()
    _plant(lake, heartbeat=time.time() - 120)
    lock = LakeLock(lake, "run-b", ttl_s=60).acquire()
    assert "no heartbeat for 12" in lock.took_over
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lock = LakeLock(lake, "run-a", heartbeat_s=0.1).acquire()
    first = json.loads(lake.fs.cat_file(lake.path(LOCK_PATH)))["heartbeat"]
    assert _wait_for(lambda: json.loads(lake.fs.cat_file(lake.path(LOCK_PATH)))["heartbeat"] > first + 0.2)
    lock.check()  # still ours
    lock.release()


def test_a_run_whose_lock_was_taken_over_stops_and_leaves_the_new_owner_alone(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lock = LakeLock(lake, "run-a", heartbeat_s=0.1).acquire()
    _plant(lake, run_id="run-b", heartbeat=time.time())  # what a takeover after a long stall looks like

    def lost() -> bool:
        try:
            lock.check()
        except LakeLockLostError:
            return True
        return False

    assert _wait_for(lost)
    lock.release()
    assert json.loads(lake.fs.cat_file(lake.path(LOCK_PATH)))["run_id"] == "run-b"


def test_an_unreadable_lock_is_treated_as_held_with_advice(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_bytes(LOCK_PATH, b"{not json")
    with pytest.raises(LakeLockedError, match="unreadable lock .*delete it"):
        LakeLock(lake, "run-b").acquire()
