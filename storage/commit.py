"""Exactly-once commit of staged shards: dedup -> intent record -> move into place -> vector merge.

Ray Data retries are at-least-once, so one input can arrive in two staged shards: the committer drops
rows whose input key is already committed for the same dataset, model revision and preprocessing.
The intent record is the commit point. A crash before it leaves only staging files (orphans, deleted
by `recover`); a crash after it is rolled forward by `recover` (every step is idempotent). Visible
files therefore only ever hold committed rows. Writers must be serialised: one committer per lake.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from storage.images import TRANSIENT_REASONS
from storage.lake import Lake, check_name

COMMITS_DIR = "_commits"
_PARTS = re.compile(r"(?:^|/)(?:model=(?P<model>[^/]+)/)?dataset=(?P<dataset>[^/]+)/")

# (model, dataset, committed embeddings rows) -> None; the flow binds it to the LanceDB merge.
OnEmbeddings = Callable[[str, str, pa.Table], None]


def input_keys(table: pa.Table) -> list[str]:
    """One input version: a changed file (size or mtime/etag) is a new input."""
    cols = [table[c].cast(pa.string()).fill_null("") for c in ("uri", "size_bytes", "source_version")]
    return pc.binary_join_element_wise(*cols, "\x1f").to_pylist()


@dataclass
class StagedShard:
    run_id: str
    shard: str
    files: dict[str, str]  # visible relative path -> staging relative path


@dataclass
class CommitStats:
    rows: dict[str, int] = field(default_factory=dict)  # kind -> rows made visible
    duplicates: int = 0  # rows dropped because their input was already committed
    resumed: bool = False  # an interrupted earlier attempt of this commit was finished instead
    shards: list[str] = field(default_factory=list)  # shards with rows made visible (all, if resumed)


def commit_record_path(run_id: str, shard: str) -> str:
    return f"{COMMITS_DIR}/{check_name('run id', run_id)}-{check_name('shard', shard)}.json"


def kind_of(rel: str) -> str:
    return rel.split("/", 1)[0]


def partition_of(rel: str) -> tuple[str | None, str]:
    m = _PARTS.search(rel)
    if m is None:
        raise ValueError(f"not a lake shard path: {rel}")
    return m.group("model"), m.group("dataset")


def stage_shard(
    lake: Lake, run_id: str, shard: str, dataset: str, tables: dict[tuple[str, str | None], pa.Table]
) -> StagedShard:
    """Write one shard's tables ({(kind, model): table}) under the run's private staging prefix."""
    files = {}
    for (kind, model), table in tables.items():
        if table.num_rows == 0:
            continue
        visible = lake.shard_path(kind, dataset, model, run_id, shard)
        staging = lake.staging_path(run_id, visible)
        lake.write_parquet(staging, table)
        files[visible] = staging
    return StagedShard(run_id, shard, files)


class Ledger:
    """What the committed lake already holds, read from the committed Parquet itself (no second truth)."""

    def __init__(self, lake: Lake):
        self.lake = lake

    def _read(self, files: Iterable[str], columns: list[str]) -> pa.Table:
        tables = [self.lake.read_parquet(f, columns) for f in files]
        return pa.concat_tables(tables) if tables else None

    def done_keys(self, dataset: str, model: str, revision: str, preprocess: str) -> set[str]:
        """Inputs embedded for this exact model revision and preprocessing."""
        cols = ["uri", "size_bytes", "source_version", "model_revision", "preprocess"]
        table = self._read(self.lake.committed_files("embeddings", model, dataset), cols)
        if table is None:
            return set()
        mask = pc.and_(pc.equal(table["model_revision"], revision), pc.equal(table["preprocess"], preprocess))
        return set(input_keys(table.filter(mask)))

    def failed_keys(
        self, dataset: str, model: str | None = None, stages: tuple[str, ...] = ("decode",)
    ) -> set[str]:
        """Inputs whose bytes cannot be decoded (or preprocessed for MODEL): a retry fails the same way.

        Model-independent failures have model null. Read and embed failures (network, OOM) and
        decode failures that may pass on another attempt (timeout, out of memory) are not included:
        a re-run retries them.
        """
        cols = ["uri", "size_bytes", "source_version", "stage", "model", "error_type"]
        table = self._read(self.lake.committed_files("errors", dataset=dataset), cols)
        if table is None:
            return set()
        same_model = pc.is_null(table["model"]) if model is None else pc.equal(table["model"], model)
        mask = pc.and_(pc.is_in(table["stage"], pa.array(stages)), same_model)
        mask = pc.and_(mask, pc.invert(pc.is_in(table["error_type"], pa.array(sorted(TRANSIENT_REASONS)))))
        return set(input_keys(table.filter(mask)))

    def patch_ids(self, dataset: str, model: str, revision: str) -> set[str]:
        files = self.lake.committed_files("patches", model, dataset)
        table = self._read(files, ["image_id", "model_revision"])
        if table is None:
            return set()
        return set(table.filter(pc.equal(table["model_revision"], revision))["image_id"].to_pylist())


class Committer:
    """The single writer of one lake during a run: deduplicates, records intent, moves, merges vectors."""

    def __init__(self, lake: Lake, on_embeddings: OnEmbeddings | None = None):
        self.lake = lake
        self.on_embeddings = on_embeddings
        self.ledger = Ledger(lake)
        self._done: dict[tuple, set[str]] = {}

    def _done_set(self, key: tuple) -> set[str]:
        """Committed keys per (kind, dataset, model, revision[, preprocess]), loaded once per run."""
        if key not in self._done:
            kind, dataset, model, revision, *rest = key
            if kind == "embeddings":
                self._done[key] = self.ledger.done_keys(dataset, model, revision, rest[0])
            elif kind == "patches":
                self._done[key] = self.ledger.patch_ids(dataset, model, revision)
            else:
                self._done[key] = set()  # error rows are events: deduplicated within this committer only
        return self._done[key]

    def _dedup(
        self, rel: str, table: pa.Table, pending: dict[tuple, set[str]]
    ) -> tuple[pa.Table, set[str], tuple]:
        """Rows of TABLE whose key is neither committed nor PENDING (earlier in the same commit)."""
        model, dataset = partition_of(rel)
        kind = kind_of(rel)
        if kind == "embeddings":
            revision, preprocess = table["model_revision"][0].as_py(), table["preprocess"][0].as_py()
            key = (kind, dataset, model, revision, preprocess)
            keys = input_keys(table)
        elif kind == "patches":
            key = (kind, dataset, model, table["model_revision"][0].as_py())
            keys = table["image_id"].to_pylist()
        else:
            key = (kind, dataset, None, None)
            # one input may fail for several models in one shard: each model's error row is its own
            rows = zip(input_keys(table), table["stage"].to_pylist(), table["model"].to_pylist(), strict=True)
            keys = [f"{k}\x1f{s}\x1f{m or ''}" for k, s, m in rows]
        done, earlier, seen, keep = self._done_set(key), pending.get(key, set()), set(), []
        for i, k in enumerate(keys):
            if k not in done and k not in earlier and k not in seen:
                seen.add(k)
                keep.append(i)
        return (table if len(keep) == len(keys) else table.take(pa.array(keep, pa.int64()))), seen, key

    def commit(self, staged: StagedShard) -> CommitStats:
        """Commit one staged shard; calling it again after a failure resumes (retries are safe)."""
        return self.commit_group([staged])

    def commit_group(self, group: list[StagedShard]) -> CommitStats:
        """Commit GROUP's shards as one: one intent record, one vector merge per partition.

        A fast device stages dozens of shards a second, and a commit's fixed cost (intent record,
        LanceDB merge_insert: ~45 ms) paid per shard would cap the run at the driver. Calling it again
        with the same group after a failure resumes (the record is named after its first shard).
        """
        first = group[0]
        record = commit_record_path(first.run_id, first.shard)
        if self.lake.exists(record):  # an earlier attempt got past its commit point: roll it forward
            with self.lake.fs.open(self.lake.path(record), "rb") as f:
                apply_intent(self.lake, json.loads(f.read())["files"], self.on_embeddings)
            self.lake.remove(record)
            self._done.clear()  # reload what is committed from the lake itself
            return CommitStats(resumed=True, shards=[g.shard for g in group])
        stats = CommitStats()
        files: dict[str, str] = {}
        new_keys: dict[tuple, set[str]] = {}
        tables: dict[str, pa.Table] = {}
        for staged in group:
            for visible, staging in sorted(staged.files.items()):
                table = self.lake.read_parquet(staging)
                kept, keys, done_key = self._dedup(visible, table, new_keys)
                stats.duplicates += table.num_rows - kept.num_rows
                if kept.num_rows == 0:
                    self.lake.remove(staging)
                    continue
                if kept.num_rows != table.num_rows:
                    self.lake.write_parquet(staging, kept)
                files[visible], tables[visible] = staging, kept
                new_keys.setdefault(done_key, set()).update(keys)
                if staged.shard not in stats.shards:
                    stats.shards.append(staged.shard)
        if files:
            self.lake.write_bytes(record, json.dumps({"run_id": first.run_id, "files": files}).encode())
            apply_intent(self.lake, files, self.on_embeddings, tables)
            self.lake.remove(record)
        for done_key, keys in new_keys.items():
            self._done_set(done_key).update(keys)
        for visible, table in tables.items():
            stats.rows[kind_of(visible)] = stats.rows.get(kind_of(visible), 0) + table.num_rows
        return stats


def apply_intent(
    lake: Lake,
    files: dict[str, str],
    on_embeddings: OnEmbeddings | None,
    tables: dict[str, pa.Table] | None = None,
) -> None:
    """Move staged files into place, then merge embeddings into the vector table. Idempotent."""
    for visible, staging in sorted(files.items(), key=lambda kv: kind_of(kv[0]) == "embeddings"):
        lake.move(staging, visible)  # embeddings last: the other kinds are never behind it
    if on_embeddings is None:
        return
    parts: dict[tuple, list[pa.Table]] = {}
    for visible in sorted(files):
        if kind_of(visible) == "embeddings":
            table = tables[visible] if tables and visible in tables else lake.read_parquet(visible)
            parts.setdefault(partition_of(visible), []).append(table)
    for (model, dataset), parts_tables in parts.items():  # one merge per partition and commit
        on_embeddings(model, dataset, pa.concat_tables(parts_tables, promote_options="default"))


@dataclass
class Recovery:
    rolled_forward: int = 0  # interrupted commits finished
    orphans_removed: int = 0  # staging files of dead runs deleted
    abandoned_runs: list[str] = field(default_factory=list)  # runs that died without finishing


def recover(lake: Lake, on_embeddings: OnEmbeddings | None = None, keep_run: str | None = None) -> Recovery:
    """Finish interrupted commits and delete staging files no commit refers to.

    Run at the start of every run, under the lake's writer lock, before planning: afterwards the lake
    holds exactly the committed rows.
    """
    report = Recovery()
    for leftover in lake.list_files(COMMITS_DIR, suffix=""):
        if not leftover.endswith(".json"):  # a temp file of an intent write that died before its rename
            lake.remove(leftover)
            report.orphans_removed += 1
    for record in lake.list_files(COMMITS_DIR, suffix=".json"):
        with lake.fs.open(lake.path(record), "rb") as f:
            intent = json.loads(f.read())
        apply_intent(lake, intent["files"], on_embeddings)
        lake.remove(record)
        report.rolled_forward += 1
    for run_dir in sorted(lake.fs.ls(lake.path("_staging"), detail=False) if lake.exists("_staging") else []):
        if run_dir.rstrip("/").rsplit("/", 1)[-1] == keep_run:
            continue
        report.orphans_removed += len(lake.fs.find(run_dir))
        lake.fs.rm(run_dir, recursive=True)
    return report
