"""Report: the run manifest in the lake and Prefect artifacts (counts, throughput, errors, outputs)."""

from __future__ import annotations

import collections
from dataclasses import asdict
from typing import Any

import pyarrow.compute as pc
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.commit import input_keys
from storage.lake import Lake
from storage.manifest import EncoderRecord, RunManifest, write_manifest
from tasks.commit import LakeSession
from tasks.config import STORAGE_RETRIES, RunConfig
from tasks.plan import ModelInfo, Plan


def new_manifest(cfg: RunConfig, run_id: str, infos: dict[str, ModelInfo]) -> RunManifest:
    specs = {m.name: m for m in cfg.models}
    encoders = [
        EncoderRecord(
            i.name,
            i.revision,
            i.preprocess,
            i.preprocess_config,
            i.dim,
            specs[i.name].dtype or "auto",
            str(specs[i.name].weights),
        )  # fmt: skip
        for i in infos.values()
    ]
    return RunManifest(run_id, cfg.source, cfg.dataset, encoders)


def _run_files(lake: Lake, kind: str, dataset: str, run_id: str, model: str | None = None) -> list[str]:
    return [
        f for f in lake.committed_files(kind, model, dataset) if f.rsplit("/", 1)[-1].startswith(f"{run_id}-")
    ]


def outcome_counts(lake: Lake, cfg: RunConfig, run_id: str, plan: Plan) -> dict[str, int]:
    """Per input, from what this run committed: embedded (every planned model) or error.

    embedded + errors + skipped_done = listed once the run has finished.
    """
    ok: dict[str, set[str]] = {}
    for m in cfg.model_names:
        keys: set[str] = set()
        for rel in _run_files(lake, "embeddings", cfg.dataset, run_id, m):
            keys.update(input_keys(lake.read_parquet(rel, ["uri", "size_bytes", "source_version"])))
        ok[m] = keys
    failed: set[str] = set()
    for rel in _run_files(lake, "errors", cfg.dataset, run_id):
        failed.update(input_keys(lake.read_parquet(rel, ["uri", "size_bytes", "source_version"])))
    embedded = sum(1 for i in plan.items if i.key not in failed and all(i.key in ok[m] for m in i.models))
    errors = sum(1 for i in plan.items if i.key in failed)
    counts = {"embedded": embedded, "errors": errors, "missing": len(plan.items) - embedded - errors}
    counts.update({f"embedded[{m}]": len(keys) for m, keys in ok.items()})
    return counts


def errors_by_reason(lake: Lake, dataset: str, run_id: str) -> dict[str, int]:
    """'stage/error_type' -> count, over this run's committed error rows."""
    counts: collections.Counter[str] = collections.Counter()
    for rel in _run_files(lake, "errors", dataset, run_id):
        table = lake.read_parquet(rel, ["stage", "error_type"])
        counts.update(pc.binary_join_element_wise(table["stage"], table["error_type"], "/").to_pylist())
    return dict(sorted(counts.items()))


@task(name="write-manifest", **STORAGE_RETRIES)
def save_manifest(session: LakeSession, manifest: RunManifest) -> str:
    return write_manifest(session.lake, manifest)


@task(name="report", **STORAGE_RETRIES)
def report(
    cfg: RunConfig, session: LakeSession, manifest: RunManifest, plan: Plan, index: dict[str, dict]
) -> dict[str, Any]:
    """Fill the manifest's counts and publish them as Prefect artifacts; returns the summary."""
    list_errors = len(plan.list_errors)
    manifest.errors_by_reason = errors_by_reason(session.lake, cfg.dataset, manifest.run_id)  # list/* too
    manifest.counts = {
        "listed": plan.listed,
        "skipped_done": plan.skipped_done,
        "planned": len(plan.items),
        **outcome_counts(session.lake, cfg, manifest.run_id, plan),
        "list_errors": list_errors,
        "duplicates_dropped": session.totals.duplicates,
    }
    manifest.committed_shards = list(session.shards)
    manifest.lance_versions = {name: info["version"] for name, info in index.items()}
    seconds = manifest.timings.get("embed", 0.0)
    manifest.timings["images_per_s"] = round(len(plan.items) / seconds, 2) if seconds else 0.0
    summary = {**asdict(manifest), "lake": session.lake.url, "index": index}
    rows = [{"metric": k, "value": v} for k, v in manifest.counts.items()]
    rows.append({"metric": "images/s", "value": manifest.timings["images_per_s"]})
    create_table_artifact(rows, key="embed-counts", description=f"towerflow run {manifest.run_id}")
    errors_md = "\n".join(f"| {k} | {v} |" for k, v in manifest.errors_by_reason.items()) or "| - | 0 |"
    create_markdown_artifact(
        f"# towerflow run `{manifest.run_id}`\n\n"
        f"- source: `{manifest.source}`\n- lake: `{session.lake.url}` (dataset `{cfg.dataset}`)\n"
        f"- models: {', '.join(f'`{e.name}@{e.revision}`' for e in manifest.encoders)}\n"
        f"- listed {plan.listed}, skipped (done) {plan.skipped_done}, "
        f"embedded {manifest.counts['embedded']}, errors {manifest.counts['errors']}, "
        f"{manifest.timings['images_per_s']} images/s\n\n"
        f"| error (stage/type) | count |\n|---|---|\n{errors_md}\n",
        key="embed-report",
    )
    return summary
