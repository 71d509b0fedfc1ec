"""Fault injection for tests: end this process at a named point of a run. A test hook, off by default.

`TOWERFLOW_FAULT="POINT@N[:ACTION]"` (several: comma-separated) fires the N-th time this process
reaches POINT. ACTION `exit` (the default) is `os._exit(1)`, a crashed worker; `killpg` SIGKILLs this
process's whole process group, as `kill -9 -PGID` or the OOM killer ends a driver and the local Ray
it started; `stall` sleeps STALL_SECONDS, a run that is surely still going when a test interrupts
it. A fault fires once per run, not once per process: the process that fires first creates an
O_EXCL marker file (holding its pid) in the directory `TOWERFLOW_FAULT_DIR`, so an actor that Ray
restarts does not die again. Unset, `maybe_fault` costs one environment lookup.

Points: `embed` (tasks.embed.EmbedActor.__call__, once per Ray batch, before the forward). The kill
tests add driver-side points around the lake's storage steps (tests/_faults.py). Ray workers see the
variables only when the process that starts Ray has them: set them on the driver (`python -m
flows.embed`), not on a process that joins a running cluster.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FAULT_ENV = "TOWERFLOW_FAULT"
FAULT_DIR_ENV = "TOWERFLOW_FAULT_DIR"

_reached: dict[str, int] = {}  # point -> times this process reached it
_lock = threading.Lock()  # a driver reaches points from more than one thread


def _exit() -> None:
    os._exit(1)


def _killpg() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


STALL_SECONDS = 30.0  # `stall`: a test's interrupt lands while it waits; shutdown may wait it out


def _stall() -> None:
    time.sleep(STALL_SECONDS)


ACTIONS: dict[str, Callable[[], None]] = {"exit": _exit, "killpg": _killpg, "stall": _stall}


@dataclass(frozen=True)
class Fault:
    point: str
    nth: int
    action: str = "exit"

    @property
    def marker(self) -> str:
        """The marker file's name: one per fault, so one fault fires once per fault directory."""
        return f"{self.point}@{self.nth}"


def parse(spec: str) -> list[Fault]:
    """`embed@3,commit@1:killpg` -> Faults; a malformed spec is an error, never silently ignored."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        where, _, action = part.partition(":")
        point, at, nth = where.partition("@")
        if not point or not at or not nth.isdigit() or int(nth) < 1 or (action or "exit") not in ACTIONS:
            raise ValueError(f"{FAULT_ENV}: {part!r} is not POINT@N[:{'|'.join(ACTIONS)}] with N >= 1")
        faults.append(Fault(point, int(nth), action or "exit"))
    return faults


def maybe_fault(point: str) -> None:
    """Call at a fault point; does nothing unless TOWERFLOW_FAULT names POINT."""
    spec = os.environ.get(FAULT_ENV)
    if spec:
        _fire(spec, point)


def _fire(spec: str, point: str) -> None:
    faults = [f for f in parse(spec) if f.point == point]
    if not faults:
        return
    with _lock:
        _reached[point] = n = _reached.get(point, 0) + 1
    for fault in faults:
        if fault.nth == n and _claim(fault):
            ACTIONS[fault.action]()


def _claim(fault: Fault) -> bool:
    """True for the one process that creates the fault's marker; it records its pid there."""
    directory = os.environ.get(FAULT_DIR_ENV)
    if not directory:
        raise RuntimeError(f"{FAULT_ENV} needs {FAULT_DIR_ENV}: without it a restarted process dies again")
    try:
        fd = os.open(Path(directory) / fault.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def fired(directory: str | os.PathLike, fault: Fault) -> int | None:
    """The pid of the process that fired FAULT under DIRECTORY, or None if it has not fired."""
    path = Path(directory) / fault.marker
    return int(path.read_text()) if path.exists() else None
