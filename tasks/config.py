"""What one embed run needs, in one picklable place (flows, Ray workers and tests share it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from prefect.cache_policies import NO_CACHE

from storage.lake import check_name, is_access_denied


def retry_unless_denied(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn (task, task_run, state) -> retry?: access denied is permanent, so
    retrying it only delays the one-line failure (and hammers the store); anything else may be transient."""
    return not is_access_denied(state.data if isinstance(state.data, BaseException) else None)


# Every task that touches storage declares these: transient object-store errors are retried by Prefect.
STORAGE_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [1, 4, 10], "cache_policy": NO_CACHE,
                                   "retry_condition_fn": retry_unless_denied}  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """One encoder of a run: name, weights and load options (preprocessing overrides included)."""

    name: str
    weights: str
    dtype: str | None = None  # None: fp16 on CUDA, fp32 on CPU
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # min_pixels, max_pixels, crop_size


@dataclass(frozen=True)
class RunConfig:
    source: str
    lake: str
    models: tuple[ModelSpec, ...]
    dataset: str = "default"
    actors: int | None = None  # embedding actors per model; None: one per GPU, else one per CPU core (<= 8)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_tokens: int | None = None  # token budget of one packed forward; None: the device's default
    batch_images: int = 64  # images per Ray batch handed to an actor (packed by tokens inside)
    patches: bool = True
    patch_dtype: str = "fp16"
    limit: int | None = None
    ray_address: str | None = None
    source_options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    lake_options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    quiet: bool = False
    wait_lock: float = 0.0  # seconds to wait while another run holds the lake's writer lock
    compile_blocks: bool = False  # torch.compile the tower's blocks in each actor (packed towers, CUDA)
    buffer_mb: int | None = None  # object store for the run's blocks in flight; None: by actor count

    def __post_init__(self) -> None:
        check_name("dataset", self.dataset)
        if not self.models:
            raise ValueError("at least one model is needed")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"a model is named twice: {', '.join(names)}")
        if (self.batch_tokens is not None and self.batch_tokens <= 0) or self.batch_images <= 0:
            raise ValueError("batch sizes must be positive")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor is not None and not 0 <= self.gpus_per_actor <= 8:
            raise ValueError(f"--gpus-per-actor must be in [0, 8], got {self.gpus_per_actor}")
        if self.wait_lock < 0:
            raise ValueError(f"--wait-lock must be >= 0 seconds, got {self.wait_lock}")
        if self.buffer_mb is not None and self.buffer_mb < 1:
            raise ValueError(f"--buffer-mb must be >= 1, got {self.buffer_mb}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


def default_ray_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None
