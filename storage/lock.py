"""One writer per lake: an exclusively created lock object with a heartbeat.

Two embed runs committing into one lake at once could both insert an image that neither saw in the
ledger when it planned, and recovery at the start of a run would treat the other run's staged files as
orphans. So a run holds LAKE/_lock/writer.json from before recovery until its last commit.

The lock is created with an exclusive create (O_EXCL locally, `If-None-Match: *` on S3 through
s3fs), refreshed by a heartbeat, and taken over only when its owner is gone: the owner's process is
dead (same host) or its heartbeat is older than `ttl_s` (any host). Limits: taking over an expired
lock on an object store is a delete followed by a create, so two runs that both wait on the same
dead owner may race in that window; a run that finds its lock taken over (it stalled longer than the
TTL) stops before its next commit.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

import psutil

from storage.lake import Lake

log = logging.getLogger(__name__)

LOCK_PATH = "_lock/writer.json"
HEARTBEAT_S = 10.0
TTL_S = 90.0


class LakeLockedError(RuntimeError):
    """Another run is writing this lake (the CLI turns this into one line and exit code 75)."""


class LakeLockLostError(RuntimeError):
    """This run's lock was taken over (it stalled longer than the TTL): stop before committing more."""


@dataclass(frozen=True)
class Owner:
    run_id: str
    host: str
    pid: int
    pid_started: float  # process start time: a reused pid is not the owner
    token: str  # unique per acquisition: how a run recognises its own lock
    acquired: float
    heartbeat: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired))
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, since {since})"

    def gone(self, now: float, ttl_s: float) -> str | None:
        """Why this owner no longer holds the lock, or None while it may still be alive."""
        if self.host == socket.gethostname():
            try:
                if psutil.Process(self.pid).create_time() != self.pid_started:
                    return f"its process {self.pid} has exited (the pid was reused)"
            except psutil.NoSuchProcess:
                return f"its process {self.pid} has exited"
        if now - self.heartbeat > ttl_s:
            return f"no heartbeat for {now - self.heartbeat:.0f} s"
        return None


@dataclass
class LakeLock:
    """`with LakeLock(lake, run_id).acquire(wait_s):` ... the run's commits ... (released on exit)."""

    lake: Lake
    run_id: str
    ttl_s: float = TTL_S
    heartbeat_s: float = HEARTBEAT_S
    owner: Owner | None = field(default=None, init=False)
    took_over: str | None = field(default=None, init=False)  # why a previous owner was gone, if one was
    _lost: str | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    # -- acquire / release ---------------------------------------------------------------------------
    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> LakeLock:
        """Take the lock, waiting up to WAIT_S for the current owner; LakeLockedError when it stays held."""
        deadline = time.monotonic() + wait_s
        waited_on = None
        while True:
            current = self._create_or_read()
            if current is None:
                break
            why = current.gone(time.time(), self.ttl_s)
            if why:
                self._remove_stale(current)
                self.took_over = f"took over the lock of {current.describe()}: {why}"
                continue
            if time.monotonic() >= deadline:
                hint = "wait for it to finish" if wait_s else "wait for it, or pass --wait-lock SECONDS"
                raise LakeLockedError(
                    f"lake {self.lake.url} is being written by {current.describe()}; {hint}"
                )
            if current.token != waited_on:
                waited_on = current.token
                log.warning("lake %s is being written by %s; waiting up to %.0f s", self.lake.url,
                            current.describe(), wait_s)
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._beat, name="lake-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.owner and not self._lost and self._read_owner() == self.owner.token:
            self.lake.remove(LOCK_PATH)
        self.owner = None

    def __enter__(self) -> LakeLock:
        if self.owner is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def check(self) -> None:
        """Raise LakeLockLostError if another run took the lock over; called before each commit."""
        if self._lost:
            raise LakeLockLostError(self._lost)

    # -- the lock object -----------------------------------------------------------------------------
    def _new_owner(self) -> Owner:
        now = time.time()
        pid = os.getpid()
        return Owner(
            self.run_id, socket.gethostname(), pid, psutil.Process(pid).create_time(),
            secrets.token_hex(8), now, now,
        )  # fmt: skip

    def _create_or_read(self) -> Owner | None:
        """Create the lock exclusively (None: it is ours now) or return its current owner."""
        owner = self._new_owner()
        path = self.lake.path(LOCK_PATH)
        self.lake.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.lake.fs.open(path, "xb") as f:
                f.write(json.dumps(asdict(owner)).encode())
        except FileExistsError:
            current = self._read()
            if current is None:
                return self._create_or_read()  # released between our create and our read: try again
            if current.token != owner.token:
                return current
            # our create went through but its response was lost, and the client's retry hit our own lock
        self.owner = owner
        return None

    def _read(self) -> Owner | None:
        try:
            return Owner(**json.loads(self.lake.fs.cat_file(self.lake.path(LOCK_PATH))))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:  # a torn or foreign file: never ours, so treat it as held
            raise LakeLockedError(
                f"lake {self.lake.url} has an unreadable lock {LOCK_PATH} ({type(e).__name__}); "
                "if no run is writing this lake, delete it"
            ) from None

    def _read_owner(self) -> str | None:
        current = self._read()
        return current.token if current else None

    def _remove_stale(self, stale: Owner) -> None:
        """Delete the stale lock only if it is still the one we judged stale."""
        if self._read_owner() == stale.token:
            self.lake.remove(LOCK_PATH)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._read_owner() != self.owner.token:
                    self._lost = f"the lake lock of run {self.run_id} was taken over by another run"
                    return
                self.owner = Owner(**{**asdict(self.owner), "heartbeat": time.time()})
                self.lake.write_bytes(LOCK_PATH, json.dumps(asdict(self.owner)).encode())
            except OSError as e:  # one missed beat is harmless: the TTL is several beats long
                log.warning("lake lock heartbeat failed (%s); next beat in %.0f s", type(e).__name__,
                            self.heartbeat_s)
