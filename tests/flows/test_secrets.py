"""S3 credentials from the environment appear in no output: logs, artifacts, manifests, Parquet, LanceDB."""

from __future__ import annotations

import os

import pytest
import s3fs
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.demo import make_corpus
from flows.embed import embed_corpus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local", "prefect_harness")]


def test_no_output_contains_the_credentials(s3, checkpoint, tmp_path, capfd, caplog):
    bucket, options = s3
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    fs = s3fs.S3FileSystem(**options)
    for f in make_corpus(tmp_path / "images", 6, seed=2):
        fs.put_file(str(f), f"{bucket}/photos/{f.name}")
    fs.put_file(__file__, f"{bucket}/photos/not-an-image.jpg")  # an error row, with its message
    summary = embed_corpus(
        source=f"s3://{bucket}/photos", out=f"s3://{bucket}/lake", model="qwen2_5_vl",
        weights=str(checkpoint("qwen2_5_vl")), actors=1, source_options=options, lake_options=options,
    )  # fmt: skip
    assert summary["counts"]["embedded"] == 6 and summary["counts"]["errors"] == 3
    out, err = capfd.readouterr()
    texts = {"stdout": out, "stderr": err, "log records": caplog.text, "summary": repr(summary)}
    for key in fs.find(f"{bucket}/lake"):
        texts[key] = fs.cat_file(key).decode("latin-1")  # manifests, Parquet (data + metadata), Lance files
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            "embed-counts", "embed-report"])))  # fmt: skip
    assert len(artifacts) >= 2
    texts.update({f"artifact {a.key}": str(a.data) for a in artifacts})
    assert sum("lake/_runs/" in k for k in texts) == 1 and any(k.endswith(".parquet") for k in texts)
    leaks = [(where, s) for where, text in texts.items() for s in secrets if s in text]
    assert leaks == []
