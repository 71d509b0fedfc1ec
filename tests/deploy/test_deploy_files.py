"""The deployment recipes, checked without servers: schemas, what is shipped, what the script runs.

The slow tests next to this one run them for real; these catch the drift that breaks a cluster run
or a nightly deployment long after the change that caused it (a dependency added to pyproject.toml
but not to the runtime env, a misspelled cluster key, a parameter the flow no longer has).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import ray
import yaml
from _deploy_support import REPO
from packaging.requirements import Requirement

from flows.embed import embed_corpus

DEPLOY = REPO / "deploy"
SECRET = re.compile(r"secret|password|passwd|token|credential|access_key|api_key", re.I)


def load(path: str) -> dict:
    return yaml.safe_load((DEPLOY / path).read_text())


def project_dependencies() -> dict[str, str]:
    """pyproject.toml's runtime dependencies, name -> specifier, less ray (the cluster runs its own)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name.lower(): str(r.specifier) for r in reqs if r.name.lower() != "ray"}


def test_prefect_yaml_nightly_deployment():
    spec = load("prefect.yaml")
    (dep,) = spec["deployments"]
    assert dep["name"] == "nightly"
    path, func = dep["entrypoint"].split(":")
    assert (REPO / path).is_file() and func == "embed_corpus"
    assert embed_corpus.name == "embed-corpus"  # the deployment is addressed as embed-corpus/nightly

    signature = inspect.signature(embed_corpus.fn)
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required == {"source", "out"} <= set(dep["parameters"])
    assert set(dep["parameters"]) <= set(signature.parameters)
    assert dep["parameters"]["model"] == "qwen2_5_vl"
    assert not [k for k in dep["parameters"] if SECRET.search(k)]
    assert dep["enforce_parameter_schema"] is True

    from prefect.client.schemas.schedules import CronSchedule

    (schedule,) = dep["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # validates both
    assert (cron.cron, cron.timezone, schedule["active"]) == ("0 2 * * *", "UTC", True)
    assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert dep["work_pool"]["name"] == "local-proc"

    # the pull step goes to the directory the build step recorded at deploy time
    (build,) = spec["build"]
    assert build["prefect.deployments.steps.run_shell_script"]["id"] == "repo"
    assert build["prefect.deployments.steps.run_shell_script"]["script"] == "pwd"
    assert spec["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ repo.stdout }}"}}]  # fmt: skip


def test_runtime_envs_are_valid_and_agree():
    from ray.runtime_env import RuntimeEnv

    full, local = load("ray/runtime_env.yaml"), load("ray/runtime_env.local.yaml")
    for env in (full, local):
        RuntimeEnv(**env)  # Ray's own validation of every field
        assert env["working_dir"] == "."
        assert {"/.git/", "/.venv/", "/demo-out/", "/tests/", "__pycache__/"} <= set(env["excludes"])
        assert not [k for k in env["env_vars"] if SECRET.search(k)]
        assert env["env_vars"]["PREFECT_HOME"].startswith("/tmp/")
    assert local["excludes"] == full["excludes"]
    assert local["env_vars"] == full["env_vars"]
    assert set(local) == {"working_dir", "excludes", "env_vars"}  # installs nothing

    pip = {Requirement(p).name.lower(): str(Requirement(p).specifier) for p in full["pip"]["packages"]}
    assert pip == project_dependencies(), "runtime_env.yaml's pip list must follow pyproject.toml"


def test_working_dir_ships_the_code_only(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files  # what `ray job submit` packs with

    target = tmp_path / "pkg.zip"
    _zip_files(str(REPO), load("ray/runtime_env.yaml")["excludes"], str(target), include_gitignore=False)
    names = zipfile.ZipFile(target).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"flows", "tasks", "encoders", "storage", "deploy", "pyproject.toml"} <= tops
    assert "flows/embed.py" in names and "deploy/ray/submit.sh" in names
    assert not tops & {".venv", ".git", "tests", "demo-out", ".whl", ".pytest_cache", ".ruff_cache"}
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".parquet"))]
    assert target.stat().st_size < 5 * 2**20


def test_cluster_yaml_passes_rays_schema():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("ray/cluster.yaml")
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert (
        types["gpu_worker"]["min_workers"] == 0
        and types["gpu_worker"]["max_workers"] <= config["max_workers"]
    )
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert "127.0.0.1" in config["head_start_ray_commands"][1]  # job API not on an open port

    # every dependency is baked into the nodes, so runtime_env.local.yaml suffices there
    setup = " ".join(config["setup_commands"])
    for package in load("ray/runtime_env.yaml")["pip"]["packages"]:
        assert f'"{package}"' in setup, package

    typo = copy.deepcopy(raw)  # the schema is strict: a misspelled key is an error, not ignored
    worker = typo["available_node_types"]["gpu_worker"]
    worker["max_worker"] = worker.pop("max_workers")
    with pytest.raises(ValidationError):
        validate_config(prepare_config(typo))


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` on PATH that prints its working directory and arguments as JSON instead of submitting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ray"
    script.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c "
        "'import json, os, sys; print(json.dumps([os.getcwd(), *sys.argv[1:]]))' \"$@\"\n"
    )
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return env


def submit(env: dict, cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEPLOY / "ray/submit.sh"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip


def test_submit_sh_runs_the_recipe(fake_ray, tmp_path):
    env = dict(fake_ray, SOURCE="/data/my photos", LAKE="s3://bucket/lake", WEIGHTS="s3://bucket/qwen",
               DATASET="photos", ADDRESS="http://head:8265", SUBMISSION_ID="nightly-1")  # fmt: skip
    done = submit(env, tmp_path, "--actors", "4", "--max-pixels", "1003520")
    assert done.returncode == 0, done.stderr
    cwd, *argv = json.loads(done.stdout)
    assert cwd == str(REPO)  # the working_dir is the repository, wherever the script is run from
    assert argv == [
        "job", "submit", "--address", "http://head:8265", "--working-dir", ".",
        "--runtime-env", "deploy/ray/runtime_env.yaml", "--submission-id", "nightly-1",
        "--", "python", "-m", "flows.embed", "/data/my photos", "--out", "s3://bucket/lake",
        "--model", "qwen2_5_vl", "--weights", "s3://bucket/qwen", "--dataset", "photos",
        "--actors", "4", "--max-pixels", "1003520",
    ]  # fmt: skip

    env = dict(fake_ray, SOURCE="s", LAKE="l", WEIGHTS="w", NO_WAIT="1",
               RUNTIME_ENV="deploy/ray/runtime_env.local.yaml")  # fmt: skip
    _, *argv = json.loads(submit(env, tmp_path).stdout)
    assert argv[:9] == ["job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                        "--runtime-env", "deploy/ray/runtime_env.local.yaml", "--no-wait"]  # fmt: skip


def test_submit_sh_names_what_is_missing(fake_ray, tmp_path):
    done = submit(dict(fake_ray, SOURCE="s3://b/images", LAKE="s3://b/lake"), tmp_path)
    assert done.returncode != 0 and done.stdout == ""
    assert "WEIGHTS" in done.stderr and "set WEIGHTS" in done.stderr
