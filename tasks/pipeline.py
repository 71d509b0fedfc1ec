"""The Ray Data pipeline of one run: items -> decode -> one actor pool per model -> staged shards.

Backpressure, retries and actor scheduling are Ray Data's. The driver consumes staged shards as they
are written and commits them as they arrive (tasks.progress.commit_groups), so a long run commits
continuously.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from storage.commit import StagedShard
from tasks.config import RunConfig
from tasks.decode import INPUT_SCHEMA, decode_batch
from tasks.embed import EmbedActor
from tasks.plan import ModelInfo, WorkItem
from tasks.write import write_batch

LOOPBACK = "127.0.0.1"
BLOCK_ROWS = 64  # inputs per Ray Data block (see run_pipeline)
LOCAL_RAY_CONFIG = {
    # Ray's default worker niceness (15) would rank the embedding actors below this driver
    "RAY_worker_niceness": "0",
    # Ray kills a worker idle for 1 s once the node runs more workers than CPUs, which a run always does
    # (actors + decode + write tasks): decode, paused by backpressure, lost its workers and Ray started
    # new ones, 19 in 150 s at 4000 images (~2 s of CPU each), and the actors' share fell to 129% of 2
    # cores (169% with this; 7.8 -> 9.7 images/s). Idle workers now live a minute.
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
}
CPU_MAX_ACTORS = 8  # per model: each CPU actor holds its own copy of the model (see actor_sizing)
BUFFER_MB_PER_ACTOR = {"gpu": 1024, "cpu": 256}  # default object-store budget of a run (see buffer_bytes)


@dataclass
class ShardResult:
    staged: StagedShard
    inputs: int
    embedded: dict[str, int]
    errors: int
    seconds: dict[str, float]  # per stage, summed over the shard's rows (worker seconds, not wall time)
    span: list[float]  # [first forward start, last forward end] (epoch seconds) of the shard's batch


def ensure_ray(address: str | None, quiet: bool = False) -> None:
    """Join ADDRESS (a cluster) or start a local Ray on loopback sized to this machine."""
    if ray.is_initialized():
        return
    with warnings.catch_warnings():
        # Ray starts its processes with fork+exec; lancedb's at-fork warning is about plain forks.
        warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
        level = logging.WARNING if quiet else logging.INFO  # Ray's "Started a local Ray instance" is INFO
        if address:
            ray.init(address=address, log_to_driver=not quiet, logging_level=level)
            return
        for key, value in LOCAL_RAY_CONFIG.items():
            os.environ.setdefault(key, value)  # the local Ray's raylet reads them at start
        if quiet:  # Ray 2.60 warns on every new local cluster that it turned token auth on (it stays on)
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=not quiet,
            logging_level=level,
        )  # fmt: skip


@dataclass(frozen=True)
class Sizing:
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads: int


def actor_sizing(cfg: RunConfig, n_models: int, resources: dict[str, float] | None = None) -> Sizing:
    """One actor per GPU by default; on a CPU, one actor per core (at most CPU_MAX_ACTORS per model).

    A CPU tower's intra-op threads meet at a barrier after every operator, so any preemption of one
    (decode, the driver's loop, Ray's own processes) stalls them all, and they spin while they wait.
    Single-threaded actors side by side lose only the preempted one's time: on 2 cores, two 1-thread
    actors embedded 11.4 images/s where one 2-thread actor embedded 8.8 (dinov2-small, same run order).
    The cap bounds memory on many-core nodes (one model copy per actor); the cores left go to threads.
    """
    resources = ray.cluster_resources() if resources is None else resources
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if cfg.actors is not None:
        actors = cfg.actors
    elif gpus_per_actor:
        actors = max(1, int(gpus / gpus_per_actor / n_models))
    else:
        actors = max(1, min(CPU_MAX_ACTORS, int(cpus // n_models)))
    # Ray's CPU slots: what is left after one decode core, shared among every actor (decode tasks run
    # at a lower priority and fill the gaps; the slots only keep Ray from oversubscribing)
    cpus_per_actor = 1.0 if gpus_per_actor else max(0.25, (cpus - 1) / (actors * n_models))
    # a CPU tower is the bottleneck: the actors' threads together use every core
    threads = 1 if gpus_per_actor else max(1, round(cpus / (actors * n_models)))
    return Sizing(actors, gpus_per_actor, min(cpus_per_actor, cpus), threads)


def buffer_bytes(cfg: RunConfig, sizing: Sizing) -> int:
    """The run's object-store budget. Ray Data only backpressures decode once an operator nears its
    share of the budget, and the default budget is a fraction of the whole object store: decode ran
    ahead of the actors through the entire corpus, so memory grew with N (and the decoded backlog
    kept the writer from a CPU slot). A budget per actor bounds what is in flight by the consumers,
    not by the corpus."""
    if cfg.buffer_mb is not None:
        return cfg.buffer_mb * 2**20
    per_actor = BUFFER_MB_PER_ACTOR["gpu" if sizing.gpus_per_actor else "cpu"]
    return sizing.actors * len(cfg.models) * per_actor * 2**20


def run_pipeline(
    cfg: RunConfig, run_id: str, items: list[WorkItem], infos: dict[str, ModelInfo]
) -> Iterator[ShardResult]:
    if not items:
        return
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the flow shows one bar: images committed, images/s, errors
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we know
    # Ray Data's INFO lines (execution plan, "finished in") go to stderr too, not to its log file only
    logging.getLogger("ray.data").setLevel(logging.WARNING if cfg.quiet else logging.INFO)
    # Ray Data's per-task USS poll reads the task's process smaps every second (a kernel walk of every
    # mapping of a 1-2 GB actor), for a statistic the run does not use.
    ctx.memory_usage_poll_interval_s = None
    rows = [
        {"uri": i.uri, "size_bytes": i.size, "source_version": i.version, "models": list(i.models)}
        for i in items
    ]
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    sizing = actor_sizing(cfg, len(cfg.models))
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=buffer_bytes(cfg, sizing)
    )
    # Blocks of at most BLOCK_ROWS inputs: a decoded block holds its rows' pixels until the actors take
    # them, so a block count fixed per run made memory grow with N (+35% PSS from 1k to 4k images).
    # At least two blocks per actor so that every actor starts at once.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_blocks = min(len(items), max(2 * sizing.actors, -(-len(items) // BLOCK_ROWS)))
    step = -(-table.num_rows // n_blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    model_args = [
        {"name": m.name, "weights": m.weights, "options": m.options, "storage_options": cfg.source_options}
        for m in cfg.models
    ]
    ds = ds.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=16, num_cpus=1,
        fn_kwargs={"models": model_args, "source_options": cfg.source_options},
        # Decode runs in its own CPU tasks, at most one per CPU. A task pool whose size differs from
        # the actor pool's is also what keeps Ray from fusing decode into the embedding actors.
        compute=TaskPoolStrategy(size=cpus if cpus != sizing.actors else cpus + 1),
    )  # fmt: skip
    for spec in cfg.models:
        ds = ds.map_batches(
            EmbedActor,
            batch_format="pyarrow",
            batch_size=cfg.batch_images,
            compute=ActorPoolStrategy(size=sizing.actors),
            num_gpus=sizing.gpus_per_actor,
            num_cpus=sizing.cpus_per_actor,
            fn_constructor_kwargs={
                "name": spec.name, "weights": spec.weights, "revision": infos[spec.name].revision,
                "dtype": spec.dtype, "options": spec.options, "storage_options": cfg.source_options,
                "batch_tokens": cfg.batch_tokens, "patches": cfg.patches, "patch_dtype": cfg.patch_dtype,
                "threads": sizing.threads, "compile_blocks": cfg.compile_blocks,
            },
        )  # fmt: skip
    write_infos = {
        name: {"revision": i.revision, "preprocess": i.preprocess, "dim": i.dim, "patch_dim": i.patch_dim,
               "dtype": "float32"}
        for name, i in infos.items()
    }  # fmt: skip
    ds = ds.map_batches(
        # no CPU slot: a shard write is light I/O, and one that waits for a slot behind decode tasks
        # delays every commit (at 4000 images the first commit came after 322 s of a 442 s run)
        write_batch, batch_format="pyarrow", batch_size=cfg.batch_images, num_cpus=0,
        fn_kwargs={"lake": cfg.lake, "lake_options": cfg.lake_options, "run_id": run_id,
                   "dataset": cfg.dataset, "infos": write_infos, "patches": cfg.patches,
                   "patch_dtype": cfg.patch_dtype},
    )  # fmt: skip
    # one block per write task output, handed over as soon as it exists: iter_rows' read-ahead of one
    # block held each shard back until the next was written (120 images = 2 blocks: every commit came
    # at the end of the run)
    rows_out = (
        row
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
        for row in batch.to_pylist()
    )
    for row in rows_out:
        yield ShardResult(
            staged=StagedShard(run_id, row["shard"], json.loads(row["files"])),
            inputs=row["inputs"],
            embedded=json.loads(row["embedded"]),
            errors=row["errors"],
            seconds=json.loads(row["seconds"]),
            span=json.loads(row["span"]),
        )
