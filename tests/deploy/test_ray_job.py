"""deploy/ray/submit.sh against a real Ray head with its job server: the repository as working_dir.

The head is started the way a cluster's head is (`ray start --head`, token auth, dashboard with the
job API), on loopback and free ports, with its temp dir in a private folder. The job runs
`python -m flows.embed` from the uploaded copy of the repository with runtime_env.local.yaml (the
nodes already have the dependencies: they are this machine); inside the job the flow must join
this cluster through RAY_ADDRESS rather than start a Ray of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from _deploy_support import BIN, N_IMAGES, REPO, count_rows, end_tree, free_port, read_table, tail

pytestmark = pytest.mark.slow


def _dashboard_missing() -> str | None:
    """Why this Ray cannot run a job server (ray[default] not installed), or None."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # moved in another Ray version: ask for the packages ray[default] adds
        import importlib.util

        missing = [m for m in ("aiohttp_cors", "opencensus", "grpc") if importlib.util.find_spec(m) is None]
        return f"missing {', '.join(missing)}" if missing else None
    error = get_dashboard_dependency_error()
    return str(error) if error else None


def with_bin() -> str:
    """PATH with this environment's scripts first: `ray` for submit.sh, `python` for the job."""
    return f"{BIN}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture
def ray_head(spawn, tmp_path):
    """A Ray head with the job server; returns (job server URL, GCS address, Ray temp dir)."""
    reason = _dashboard_missing()
    if reason:
        pytest.skip(f"Ray's job server needs ray[default] ({reason}): pip install 'ray[default]'")
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes
    temp = Path(tempfile.mkdtemp(prefix="tfray-", dir="/tmp"))
    gcs, dashboard = free_port(), free_port()
    options = {  # every listening port explicit: other Rays on this machine hold the defaults
        "--object-store-memory": 512 * 2**20,
        "--port": gcs, "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
    }  # fmt: skip
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=with_bin())
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]  # tests/conftest.py sets them
    log = tmp_path / "ray-start.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
           "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", str(temp),
           "--disable-usage-stats", *(str(x) for kv in options.items() for x in kv)]  # fmt: skip
    with log.open("wb") as out:
        head = spawn(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert head.wait(timeout=120) == 0, tail(log)
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60
        while True:  # the job API answers once the dashboard has loaded its modules
            try:
                request = urllib.request.Request(
                    f"{url}/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
                )
                with urllib.request.urlopen(request, timeout=2) as r:
                    assert json.load(r)["ray_version"]
                    break
            except OSError:
                assert time.monotonic() < deadline, f"no job server at {url}:\n{tail(log)}"
                time.sleep(0.5)
        yield url, f"127.0.0.1:{gcs}", temp
    finally:
        end_tree(head.pid)  # the head's session: GCS, raylet, dashboard, workers, job drivers
        shutil.rmtree(temp, ignore_errors=True)


def job_summary(logs: str) -> dict:
    """The run summary `--json` prints: from a line '{' to the next line '}'."""
    lines = logs.splitlines()
    start = lines.index("{")
    end = lines.index("}", start)
    return json.loads("\n".join(lines[start : end + 1]))


def test_submit_recipe_runs_the_flow_on_the_cluster(ray_head, corpus, checkpoint, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    url, gcs, ray_temp = ray_head
    lake, prefect_home = tmp_path / "lake", tmp_path / "job-prefect-home"
    # runtime_env.local.yaml as shipped, with this test's sandbox for the job's Prefect and caches
    runtime_env = yaml.safe_load((REPO / "deploy/ray/runtime_env.local.yaml").read_text())
    runtime_env["env_vars"].update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TOWERFLOW_CACHE=str(tmp_path / "job-cache"),
        HF_HOME=str(tmp_path / "job-hf"),
    )
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    submission = f"towerflow-test-{secrets.token_hex(4)}"
    env = dict(os.environ, PATH=with_bin(), ADDRESS=url, RUNTIME_ENV=str(env_file), SUBMISSION_ID=submission,
               SOURCE=str(corpus), LAKE=str(lake), WEIGHTS=str(checkpoint("qwen2_5_vl")))  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    client = JobSubmissionClient(url)
    try:
        done = subprocess.run([str(REPO / "deploy/ray/submit.sh"), "--actors", "1", "--quiet", "--json"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    except subprocess.TimeoutExpired:
        client.stop_job(submission)
        pytest.fail(f"job still running after 300 s:\n{client.get_job_logs(submission)[-4000:]}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"Job '{submission}' succeeded" in output

    info = client.get_job_info(submission)
    assert info.status == JobStatus.SUCCEEDED and info.driver_exit_code == 0
    assert info.entrypoint.startswith(f"python -m flows.embed {corpus} --out {lake} --model qwen2_5_vl ")
    logs = client.get_job_logs(submission)
    summary = job_summary(logs)
    c = summary["counts"]
    assert summary["status"] == "succeeded" and summary["lake"] == str(lake)
    assert (c["listed"], c["embedded"], c["errors"], c["skipped_done"]) == (N_IMAGES + 2, N_IMAGES, 2, 0)

    # the flow joined this cluster (RAY_ADDRESS of the job), it did not start a Ray of its own: its
    # embedding actors ran here (under --quiet, Ray's own "Connecting to existing Ray cluster" INFO
    # line is not printed any more)
    assert "Started a local Ray instance" not in logs and "\tINFO worker.py" not in logs
    actors = list_actors(address=url, filters=[("job_id", "=", info.job_id)], limit=100)
    assert any("EmbedActor" in a.class_name for a in actors), [a.class_name for a in actors]

    # what was shipped: the packages, not the environment, the tests or the history
    unpacked = ray_temp / "session_latest/runtime_resources/working_dir_files"
    (shipped,) = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
    assert (shipped / "flows/embed.py").is_file() and (shipped / "deploy/ray/submit.sh").is_file()
    assert {"tasks", "encoders", "storage", "pyproject.toml"} <= {p.name for p in shipped.iterdir()}
    assert not {".venv", ".git", "tests", "demo-out"} & {p.name for p in shipped.iterdir()}
    # the job's Prefect state went where the runtime env said
    assert (prefect_home / "prefect.db").is_file()

    assert count_rows(lake, "embeddings") == N_IMAGES
    assert count_rows(lake, "patches") == N_IMAGES
    rows = read_table(lake, "embeddings", ["uri", "model", "dataset"])
    assert {(r["model"], r["dataset"]) for r in rows} == {("qwen2_5_vl", "default")}
    assert len({r["uri"] for r in rows}) == N_IMAGES
    errors = read_table(lake, "errors", ["uri", "stage"])
    assert sorted((Path(e["uri"]).name, e["stage"]) for e in errors) == [
        ("broken-not-an-image.png", "decode"), ("broken-truncated.jpg", "decode")]  # fmt: skip
    manifests = [json.loads(p.read_text()) for p in (lake / "_runs").glob("*.json")]
    assert [(m["run_id"], m["status"]) for m in manifests] == [(summary["run_id"], "succeeded")]
