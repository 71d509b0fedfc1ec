"""Run manifests LAKE/_runs/<run_id>.json: what a run read, with which model, and what it committed.

A manifest holds no credentials: the source URL is redacted and storage options never reach it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from storage.lake import Lake, check_name, redact_url

RUNS_DIR = "_runs"


@dataclass
class EncoderRecord:
    name: str
    revision: str
    preprocess: str  # hash of the preprocessing config
    preprocess_config: dict[str, Any] = field(default_factory=dict)
    dim: int = 0
    dtype: str = ""
    weights: str = ""  # where the weights came from (credentials removed), so search can reload them

    def __post_init__(self) -> None:
        self.weights = redact_url(str(self.weights))


@dataclass
class RunManifest:
    run_id: str
    source: str
    dataset: str
    encoders: list[EncoderRecord] = field(default_factory=list)
    status: str = "running"  # running | succeeded | failed | interrupted | abandoned (the run died)
    counts: dict[str, int] = field(default_factory=dict)  # listed, skipped_done, embedded, errors, ...
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    committed_shards: list[str] = field(default_factory=list)
    lance_versions: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    finished_at: str | None = None

    def __post_init__(self) -> None:
        check_name("run id", self.run_id)
        check_name("dataset", self.dataset)
        self.source = redact_url(str(self.source))
        self.encoders = [e if isinstance(e, EncoderRecord) else EncoderRecord(**e) for e in self.encoders]

    def finish(self, status: str) -> None:
        self.status = status
        self.finished_at = datetime.now(timezone.utc).isoformat()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def write_manifest(lake: Lake, manifest: RunManifest) -> str:
    rel = f"{RUNS_DIR}/{manifest.run_id}.json"
    lake.write_bytes(rel, manifest.to_json().encode())
    return rel


def read_manifest(lake: Lake, run_id: str) -> RunManifest:
    with lake.fs.open(lake.path(f"{RUNS_DIR}/{check_name('run id', run_id)}.json"), "rb") as f:
        return RunManifest(**json.loads(f.read()))


def list_manifests(lake: Lake) -> list[RunManifest]:
    """Every run of this lake, oldest first (run ids start with their UTC start time)."""
    runs = []
    for rel in lake.list_files(RUNS_DIR, suffix=".json"):
        with lake.fs.open(lake.path(rel), "rb") as f:
            runs.append(RunManifest(**json.loads(f.read())))
    return sorted(runs, key=lambda r: r.run_id)


def abandon_dead_runs(lake: Lake, keep_run: str) -> list[str]:
    """Mark "running" manifests of other runs as abandoned: under the writer lock no other run is alive,
    so such a run was killed (SIGKILL, a lost node) before it could record how it ended."""
    dead = [m for m in list_manifests(lake) if m.status == "running" and m.run_id != keep_run]
    for manifest in dead:
        manifest.status = "abandoned"  # finished_at stays unknown
        write_manifest(lake, manifest)
    return [m.run_id for m in dead]
