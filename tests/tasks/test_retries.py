"""A storage task that fails transiently is retried by Prefect, and the flow succeeds."""

from __future__ import annotations

import pytest
from _lake_rows import embeddings
from prefect import flow

from storage.commit import Committer, stage_shard
from storage.lake import Lake, new_run_id
from tasks.commit import LakeSession, commit_shards
from tasks.pipeline import ShardResult

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_transient_storage_failure_is_retried_by_prefect(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run = new_run_id()
    staged = stage_shard(lake, run, "00000", "d", {("embeddings", "m"): embeddings(["a.jpg", "b.jpg"], run)})
    real_move, failures = lake.move, []

    def flaky_move(src, dst):
        if not failures:  # the first attempt dies on a 503-like error after its commit point
            failures.append(dst)
            raise OSError("503 SlowDown (injected)")
        real_move(src, dst)

    lake.move = flaky_move
    session = LakeSession(lake, "d", tables={}, committer=Committer(lake))
    result = ShardResult(staged, inputs=2, embedded={"m": 2}, errors=0, seconds={}, span=[])

    @flow
    def one_commit():
        return commit_shards(session, [result], return_state=True)

    state = one_commit()
    assert state.is_completed() and failures  # failed once, then Prefect's retry finished it
    assert state.result().resumed
    assert lake.committed_files("embeddings") == [f"embeddings/model=m/dataset=d/{run}-00000.parquet"]
    assert lake.read_parquet(lake.committed_files("embeddings")[0]).num_rows == 2
