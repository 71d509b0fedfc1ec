"""Shared fixtures: a sandboxed environment, tiny random-weight checkpoints, varied test images."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch
from _support import smooth_image
from PIL import Image

import encoders

# Ray reads these when it is imported (test modules import it at collection): token auth without
# writing ~/.ray/auth_token, and a local Ray that listens on 127.0.0.1 only.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def _sandbox(tmp_path_factory: pytest.TempPathFactory):
    """Nothing a test does may write to the home directory or reach the network."""
    root = tmp_path_factory.mktemp("sandbox")
    env = {
        "TOWERFLOW_CACHE": str(root / "cache"),
        "HF_HOME": str(root / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_HOME": str(root / "prefect"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """checkpoint(name, layout='vision', seed=0) -> a tiny checkpoint directory, built once per session."""
    made: dict[tuple[str, str, int], Path] = {}

    def get(name: str, layout: str = "vision", seed: int = 0) -> Path:
        key = (name, layout, seed)
        if key not in made:
            made[key] = encoders.make_checkpoint(
                name, tmp_path_factory.mktemp(f"{name}-{layout}-{seed}"), layout, seed
            )
        return made[key]

    return get


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three sizes and aspect ratios: landscape, tall, small square."""
    return [smooth_image(120, 200, 1), smooth_image(300, 90, 2), smooth_image(64, 64, 3)]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a random port): real S3 protocol, no network."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
             "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3(s3_server, request):
    """A fresh bucket per test: (bucket, storage_options for fsspec/s3fs)."""
    import boto3
    import s3fs

    bucket = "tf-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    options = {"endpoint_url": s3_server}
    s3fs.S3FileSystem.clear_instance_cache()
    yield bucket, options
    fs = s3fs.S3FileSystem(**options)
    fs.rm(f"{bucket}", recursive=True)


@pytest.fixture(scope="session")
def ray_local(_sandbox, s3_server):
    """A local Ray on 127.0.0.1 with 2 CPUs, shared by the tests of a session.

    Started after the S3 server so that its workers inherit the (test) AWS credentials from the
    environment, as workers of a real cluster get theirs from the node's credential chain.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness(_sandbox):
    """Prefect's own test harness: a temporary API on a throwaway SQLite database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
