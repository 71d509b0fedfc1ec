"""Prefect tasks around the lake: open + recover, commit one shard, refresh the vector indexes.

They touch storage, so they declare retries; the committer makes a retried commit resume, not repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
from prefect import task

from storage.commit import CommitStats, Committer, Recovery, recover, stage_shard
from storage.lake import Lake
from storage.manifest import abandon_dead_runs
from storage.schema import ERRORS_SCHEMA
from storage.sources import ListError
from storage.vectors import IndexPolicy, VectorTable
from tasks.config import STORAGE_RETRIES, RunConfig
from tasks.pipeline import ShardResult
from tasks.plan import ModelInfo


@dataclass
class LakeSession:
    """The run's single writer: the lake, its vector tables and the committer."""

    lake: Lake
    dataset: str
    tables: dict[str, VectorTable]
    committer: Committer | None = None
    recovery: Recovery | None = None
    totals: CommitStats = field(default_factory=CommitStats)
    shards: list[str] = field(default_factory=list)

    def merge_vectors(self, model: str, dataset: str, rows: pa.Table) -> None:
        rows = rows.append_column("dataset", pa.array([dataset] * rows.num_rows, pa.string()))
        self.tables[model].merge(rows)


@task(name="open-lake", **STORAGE_RETRIES)
def open_lake(cfg: RunConfig, infos: dict[str, ModelInfo], run_id: str) -> LakeSession:
    """Open LAKE, finish any interrupted commit and drop orphaned staging files before planning."""
    lake = Lake(cfg.lake, cfg.lake_options)
    tables = {
        name: VectorTable.open(cfg.lake, name, info.dim, cfg.lake_options) for name, info in infos.items()
    }
    session = LakeSession(lake, cfg.dataset, tables)
    session.recovery = recover(lake, session.merge_vectors, keep_run=run_id)
    session.recovery.abandoned_runs = abandon_dead_runs(lake, keep_run=run_id)
    session.committer = Committer(lake, session.merge_vectors)
    return session


@task(name="commit-shards", **STORAGE_RETRIES)
def commit_shards(session: LakeSession, results: list[ShardResult]) -> CommitStats:
    """RESULTS' shards in one commit (see Committer.commit_group); a retry resumes it."""
    stats = session.committer.commit_group([r.staged for r in results])
    for kind, n in stats.rows.items():
        session.totals.rows[kind] = session.totals.rows.get(kind, 0) + n
    session.totals.duplicates += stats.duplicates
    session.shards.extend(stats.shards)
    return stats


@task(name="commit-list-errors", **STORAGE_RETRIES)
def commit_list_errors(session: LakeSession, run_id: str, errors: list[ListError]) -> CommitStats:
    """Entries the listing could not read are error rows (stage "list") like any other failure."""
    now = datetime.now(timezone.utc)
    rows = [
        {"uri": e.uri, "stage": "list", "error_type": e.error_type, "message": e.message, "run_id": run_id,
         "created_at": now}
        for e in errors
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
    staged = stage_shard(session.lake, run_id, "list", session.dataset, {("errors", None): table})
    stats = session.committer.commit(staged)
    session.totals.rows["errors"] = session.totals.rows.get("errors", 0) + stats.rows.get("errors", 0)
    return stats


@task(name="refresh-index", **STORAGE_RETRIES)
def refresh_indexes(session: LakeSession, policy: IndexPolicy | None = None) -> dict[str, dict]:
    """Create the ANN index once a table passes the size threshold; keep it current as it grows."""
    out = {}
    for name, table in session.tables.items():
        action = table.refresh_index(policy or IndexPolicy())
        out[name] = {"index": action, "rows": table.count(), "version": table.version}
    return out


@task(name="clean-staging", **STORAGE_RETRIES)
def clean_staging(session: LakeSession, run_id: str) -> None:
    """What is left under this run's staging prefix was never committed (e.g. a retried Ray task)."""
    session.lake.remove(Lake.staging_path(run_id, "").rstrip("/"), recursive=True)
