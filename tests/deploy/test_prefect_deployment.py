"""deploy/prefect.yaml against a real Prefect server: deploy, schedule, run through a process worker.

What a user does, command for command (deploy/README.md): start a server, create the work pool,
`prefect deploy` from the repository root, `prefect deployment run` with their parameters, a worker.
Two runs are queued at once: the deployment's concurrency limit lets one write the lake and holds
the other back (ENQUEUE), which is the guarantee the nightly schedule relies on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from _deploy_support import BIN, N_IMAGES, REPO, count_rows, free_port, read_table, tail

pytestmark = pytest.mark.slow
PREFECT = str(BIN / "prefect")
DEPLOYMENT = "embed-corpus/nightly"


@pytest.fixture
def server(tmp_path, spawn):
    """`prefect server start` on a free loopback port; returns the environment of its CLI calls."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        # The flow run starts its own local Ray: token auth from the environment, loopback only.
        RAY_AUTH_MODE=os.environ["RAY_AUTH_MODE"],
        RAY_AUTH_TOKEN=os.environ["RAY_AUTH_TOKEN"],
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"prefect server exited ({proc.returncode}):\n{tail(log)}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if json.load(r) is True:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"prefect server not healthy after 90 s:\n{tail(log)}"
        time.sleep(0.5)
    return env


def prefect(env: dict, *args: str, timeout: float = 120) -> str:
    """Run the prefect CLI from the repository root; returns its output, fails the test on an error."""
    done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{output[-4000:]}"
    return output


def inspect(env: dict, kind: str, name: str) -> dict:
    return json.loads(prefect(env, kind, "inspect", name, "--output", "json"))


def test_nightly_deployment_runs_once_at_a_time(server, spawn, corpus, checkpoint, tmp_path):
    env = server
    prefect(env, "work-pool", "create", "local-proc", "--type", "process")
    out = prefect(env, "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    assert f"Deployment '{DEPLOYMENT}' successfully created" in out

    dep = inspect(env, "deployment", DEPLOYMENT)
    assert dep["entrypoint"] == "flows/embed.py:embed_corpus"
    assert dep["work_pool_name"] == "local-proc"
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in dep["schedules"]] == [
        ("0 2 * * *", "UTC", True)]  # fmt: skip
    assert dep["global_concurrency_limit"]["limit"] == 1
    assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert dep["enforce_parameter_schema"] is True
    assert set(dep["parameters"]) == {"source", "out", "model", "weights", "dataset", "wait_lock"}
    # the pull step sends every run to the checkout `prefect deploy` ran in
    assert dep["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]  # fmt: skip

    lake = tmp_path / "lake"
    params = {"source": str(corpus), "out": str(lake), "weights": str(checkpoint("qwen2_5_vl")),
              "dataset": "nightly_test", "actors": 1, "quiet": True}  # fmt: skip
    runs = []
    for _ in range(2):  # e.g. last night's run still going when tonight's is due
        out = prefect(env, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params))
        runs.append(re.search(r"UUID: ([0-9a-f-]{36})", out).group(1))

    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        worker = spawn([PREFECT, "--no-prompt", "worker", "start", "--pool", "local-proc", "--run-once",
                        "--install-policy", "never"], cwd=tmp_path, env=env, stdout=sink,
                       stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert worker.wait(timeout=240) == 0, tail(log)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker still running after 240 s:\n{tail(log)}")

    states = {}
    for run in runs:
        info = inspect(env, "flow-run", run)
        assert info["deployment_id"] == dep["id"]
        assert info["parameters"]["dataset"] == "nightly_test"
        states[run] = (info["state"]["type"], info["state"]["name"])
    expected = [("COMPLETED", "Completed"), ("SCHEDULED", "AwaitingConcurrencySlot")]
    assert sorted(states.values()) == expected, f"{states}\n{tail(log)}"

    # one run wrote the lake, the other has not touched it
    manifests = [json.loads(p.read_text()) for p in (lake / "_runs").glob("*.json")]
    assert [(m["status"], m["dataset"]) for m in manifests] == [("succeeded", "nightly_test")]
    counts = manifests[0]["counts"]
    assert (counts["listed"], counts["embedded"], counts["errors"]) == (N_IMAGES + 2, N_IMAGES, 2)
    assert count_rows(lake, "embeddings") == N_IMAGES
    assert count_rows(lake, "patches") == N_IMAGES
    rows = read_table(lake, "embeddings", ["uri", "model", "dataset"])
    assert {(r["model"], r["dataset"]) for r in rows} == {("qwen2_5_vl", "nightly_test")}
    assert {Path(r["uri"]).parent for r in rows} == {corpus}
    errors = read_table(lake, "errors", ["uri", "stage"])
    assert sorted((Path(e["uri"]).name, e["stage"]) for e in errors) == [
        ("broken-not-an-image.png", "decode"), ("broken-truncated.jpg", "decode")]  # fmt: skip
