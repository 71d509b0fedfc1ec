"""Plan: list SOURCE, then keep only what the committed lake lacks for each model revision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import encoders
from storage.commit import Ledger
from storage.lake import Lake
from storage.sources import ListError, SourceConfig, SourceItem, list_source
from tasks.config import ModelSpec, RunConfig

KEY_SEP = "\x1f"


@dataclass(frozen=True)
class ModelInfo:
    """What the planner and the report need of a model, learnt without building it."""

    name: str
    revision: str
    preprocess: str
    preprocess_config: dict[str, Any]
    dim: int
    patch_dim: int


@dataclass
class WorkItem:
    uri: str
    size: int | None
    version: str | None
    models: tuple[str, ...]  # the models that still lack this input

    @property
    def key(self) -> str:
        return KEY_SEP.join(["" if v is None else str(v) for v in (self.uri, self.size, self.version)])


@dataclass
class Plan:
    items: list[WorkItem] = field(default_factory=list)
    listed: int = 0
    skipped_done: int = 0  # every model already has it (or its bytes are known not to decode)
    list_errors: list[ListError] = field(default_factory=list)


def model_info(spec: ModelSpec, storage_options: dict | None = None) -> ModelInfo:
    pre = encoders.load_preprocessor(
        spec.name, spec.weights, storage_options=storage_options, revision=True, **spec.options
    )
    return ModelInfo(
        spec.name, pre.revision, pre.preprocess_hash, pre.processor_config(), pre.dim, pre.patch_dim
    )


def make_plan(cfg: RunConfig, lake: Lake, infos: dict[str, ModelInfo]) -> Plan:
    """Inputs in listing order; a changed file (size, mtime/etag) or a new revision is planned again."""
    ledger = Ledger(lake)
    done = {
        name: ledger.done_keys(cfg.dataset, name, info.revision, info.preprocess)
        | ledger.failed_keys(cfg.dataset, name)
        for name, info in infos.items()
    }
    failed = ledger.failed_keys(cfg.dataset)
    plan = Plan()
    for entry in list_source(cfg.source, SourceConfig(storage_options=cfg.source_options)):
        if isinstance(entry, ListError):
            plan.list_errors.append(entry)
            continue
        plan.listed += 1
        item = _work_item(entry, done, failed)
        if item.models:
            plan.items.append(item)
        else:
            plan.skipped_done += 1
        if cfg.limit is not None and len(plan.items) >= cfg.limit:
            break
    return plan


def _work_item(entry: SourceItem, done: dict[str, set[str]], failed: set[str]) -> WorkItem:
    item = WorkItem(entry.uri, entry.size, entry.version, ())
    if item.key in failed:
        return item
    item.models = tuple(name for name, keys in done.items() if item.key not in keys)
    return item
