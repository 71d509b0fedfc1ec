"""Killed processes: an embedding actor that dies mid-run, a driver SIGKILLed at several points; the
test hook (tasks.faults) that kills them.

Each run is `python -m flows.embed` in its own session with its own local Ray (tests/_faults.py), so
TOWERFLOW_FAULT reaches the Ray workers and killing the session ends the whole run; every test checks
that no process of it outlives the test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _faults import REPO, Child, LakeState, check_lake, start_embed
from prefect.settings import PREFECT_API_URL

from flows.demo import make_corpus
from flows.embed import embed_corpus
from storage.lake import Lake
from storage.manifest import list_manifests
from tasks.faults import Fault, fired, parse

MODEL = "qwen2_5_vl"
N = 32  # good images; make_corpus adds two broken files
RUN_S = 300  # a whole run, startup included, on a busy 2-core machine
SEED = int(os.environ.get("TOWERFLOW_KILL_SEED", "20261126"))  # other seeds: other random kill points


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, set[str], set[str]]:
    """(source dir, names of the good images, names of the broken files)."""
    paths = make_corpus(tmp_path / "images", N, seed=7)
    names = {p.name for p in paths}
    broken = {n for n in names if n.startswith("broken-")}
    return tmp_path / "images", names - broken, broken


@pytest.fixture
def children():
    """Children started by a test, reaped at its end whatever happened (a failed test leaks nothing)."""
    started: list[Child] = []
    yield started
    for child in started:
        child.reap()


def _reap(child: Child) -> None:
    """Wait until no process of the child's session runs; one that had to be killed fails the test."""
    leftovers = child.reap()
    assert not leftovers, f"processes outlived their run (killed now): {leftovers}"


def _names(uris: set[str]) -> set[str]:
    return {u.rsplit("/", 1)[-1] for u in uris}


def _run_until_fault(tmp: Path, children: list[Child], fault: str, *args) -> Child:
    """Start a run that kills its own session at FAULT; assert it died there, by SIGKILL."""
    child = start_embed(tmp, *args, fault=fault, api_url=PREFECT_API_URL.value())
    children.append(child)
    code = child.wait(RUN_S)
    assert code == -signal.SIGKILL, f"exit {code}, expected death at {fault}:\n{child.output()}"
    assert fired(tmp / "faults", parse(fault)[0]) == child.proc.pid
    _reap(child)
    return child


def _assert_complete(state: LakeState, good: set[str], broken: set[str]) -> None:
    """Every input exactly once (check_lake asserted no duplicates), Parquet and LanceDB agreeing."""
    assert _names(state.embedded_uris) == good and state.rows["embeddings"] == len(good)
    assert state.rows["patches"] == len(good)
    assert state.lance_ids == state.embedded_ids
    assert _names(state.error_uris) == broken and state.rows["errors"] == len(broken)
    assert state.staging == [] and state.intents == []


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_actor_killed_mid_run_is_restarted_and_every_input_lands_once(checkpoint, corpus, tmp_path, children):
    source, good, broken = corpus
    lake = tmp_path / "lake"
    fault = Fault("embed", 2)  # the only actor dies (os._exit) on its second batch; Ray must restart it
    child = start_embed(tmp_path, source, lake, checkpoint(MODEL), fault=f"{fault.point}@{fault.nth}",
                        api_url=PREFECT_API_URL.value())  # fmt: skip
    children.append(child)
    assert child.wait(RUN_S) == 0, child.output()
    _reap(child)
    dead = fired(tmp_path / "faults", fault)
    assert dead is not None and dead != child.proc.pid, "the fault never fired in an actor"
    assert not psutil.pid_exists(dead) or psutil.Process(dead).status() == psutil.STATUS_ZOMBIE
    _assert_complete(check_lake(lake, MODEL), good, broken)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local", "prefect_harness")
def test_driver_sigkilled_at_three_points_then_rerun_is_exactly_once(checkpoint, corpus, tmp_path, children):
    """One lake, killed runs in a row (each also recovers its predecessor), then a run that completes.

    After every kill, before anything recovers: every visible file reads whole, no input is there twice,
    LanceDB is never ahead of Parquet. The kill points: after a commit moved its files but before the
    LanceDB merge; after an intent record, before any move; before a seeded random one of the driver's
    first 20 storage steps (writes, moves, removals, LanceDB merges; in recovery, manifests or commits).
    """
    source, good, broken = corpus
    lake, weights = tmp_path / "lake", checkpoint(MODEL)
    args = (source, lake, weights)

    _run_until_fault(tmp_path / "a", children, "commit.after-move@1:killpg", *args)
    state = check_lake(lake, MODEL)
    assert state.embedded_ids and state.lance_ids < state.embedded_ids  # moved, not yet merged
    assert len(state.intents) == 1

    _run_until_fault(tmp_path / "b", children, "commit.after-intent@1:killpg", *args)
    state = check_lake(lake, MODEL)
    assert state.lance_ids == state.embedded_ids  # b's recovery finished a's commit
    assert len(state.intents) == 1
    intent = json.loads((lake / state.intents[0]).read_text())
    assert intent["files"] and not any((lake / rel).exists() for rel in intent["files"])  # nothing moved
    assert all((lake / rel).exists() for rel in intent["files"].values())  # still staged

    # a seeded random point among the driver's storage steps (recovery, manifests, commits)
    step = random.Random(SEED).randint(1, 20)  # a run here takes 23+ steps
    _run_until_fault(tmp_path / "c", children, f"lake-op@{step}:killpg", *args)
    check_lake(lake, MODEL)

    summary = embed_corpus(source=str(source), out=str(lake), model=MODEL, weights=str(weights), actors=1,
                           batch_images=8, quiet=True)  # fmt: skip
    assert summary["status"] == "succeeded"
    counts = summary["counts"]
    assert counts["skipped_done"] + counts["embedded"] + counts["errors"] == counts["listed"] == N + 2
    _assert_complete(check_lake(lake, MODEL), good, broken)
    statuses = sorted(m.status for m in list_manifests(Lake(str(lake))))
    assert statuses.count("succeeded") == 1 and set(statuses) <= {"succeeded", "abandoned"}  # none "running"


def _count_to_five(fault: str | None, fault_dir: Path | None) -> subprocess.CompletedProcess:
    """A process that reaches the `embed` point five times, printing before each."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOWERFLOW_FAULT", "TOWERFLOW_FAULT_DIR")}
    env.update({"TOWERFLOW_FAULT": fault} if fault else {})
    env.update({"TOWERFLOW_FAULT_DIR": str(fault_dir)} if fault_dir else {})
    code = "from tasks.faults import maybe_fault as f\nfor i in range(5): print(i, flush=True); f('embed')"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_fault_hook_fires_at_the_nth_call_once_per_fault_dir(tmp_path):
    first = _count_to_five("embed@3", tmp_path)
    assert (first.returncode, first.stdout.split()) == (1, ["0", "1", "2"])  # died on its 3rd call
    assert fired(tmp_path, Fault("embed", 3)) not in (None, os.getpid())
    again = _count_to_five("embed@3", tmp_path)  # a restarted worker of the same run does not die again
    assert (again.returncode, len(again.stdout.split())) == (0, 5)
    assert _count_to_five(None, tmp_path).returncode == 0
    assert _count_to_five("commit.after-move@1", tmp_path).returncode == 0  # another point: untouched


def test_fault_hook_needs_its_marker_dir_and_a_well_formed_spec():
    no_dir = _count_to_five("embed@1", None)
    assert no_dir.returncode == 1 and "TOWERFLOW_FAULT needs TOWERFLOW_FAULT_DIR" in no_dir.stderr
    assert parse("embed@3, commit.after-intent@1:killpg") == [
        Fault("embed", 3), Fault("commit.after-intent", 1, "killpg")
    ]  # fmt: skip
    for bad in ("embed", "embed@0", "embed@x", "embed@1:explode", "@2"):
        with pytest.raises(ValueError, match="POINT@N"):
            parse(bad)
