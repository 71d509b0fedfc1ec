"""Helpers of the deployment tests: free ports, ending what a test started, reading the lake.

The servers these tests start (a Prefect server, a Ray head) are started in sessions of their own and
ended by session id in teardown: every process they spawned, however deep, and only those. `ray stop`
is not used: it ends every Ray process of the machine by name, including other users' clusters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the console scripts (prefect, ray) of this environment
N_IMAGES = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) of every live process, from /proc (Linux)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        state, ppid, sid = fields[0], int(fields[1]), int(fields[3])
        if state not in ("Z", "X"):
            out[int(entry)] = (ppid, sid, state)
    return out


def end_tree(root: int, grace: float = 5.0) -> None:
    """End the session ROOT leads, and every session started by a process of it, recursively.

    ROOT was started with start_new_session, so its session id is its pid, even after it exits
    (`ray start` does, leaving its daemons reparented to init). Ray workers, job drivers and Prefect
    flow runs start sessions of their own; their parent process ties each of them to ROOT's.
    SIGTERM first; what is left after GRACE seconds (Ray's GCS and agents can ignore it for longer)
    gets SIGKILL, as `ray stop` does.
    """
    own = os.getsid(0)

    def members() -> list[int]:
        procs = _procs()
        sessions = {root}
        while True:
            inside = {p for p, (_, sid, _) in procs.items() if sid in sessions}
            spawned = {procs[p][1] for p, (ppid, _, _) in procs.items() if ppid in inside}
            if spawned <= sessions:
                return sorted(inside - {os.getpid()}) if own not in sessions else []
            sessions |= spawned

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            with contextlib.suppress(OSError):  # gone meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not members():
            return


def tail(path: Path, n: int = 60) -> str:
    """The end of a log file, for assertion messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


def count_rows(lake: Path, table: str) -> int:
    """Rows of one hive-partitioned table of the lake (embeddings, patches, errors)."""
    return pads.dataset(lake / table, format="parquet", partitioning="hive").count_rows()


def read_table(lake: Path, table: str, columns: list[str]) -> list[dict]:
    ds = pads.dataset(lake / table, format="parquet", partitioning="hive")
    return ds.to_table(columns=columns).to_pylist()
