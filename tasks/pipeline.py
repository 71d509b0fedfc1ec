"""The Ray Data pipeline of one run: items -> decode -> one actor pool per model -> staged shards.

Backpressure, retries and actor scheduling are Ray Data's. The driver consumes staged shards as they
are written and commits them one by one, so a long run commits continuously.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

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
COMMIT_EVERY_S = 1.0  # a commit starts at most this long after the previous one ended (see commit_groups)
STEADY_TRIM = 0.1  # steady state leaves out the first and the last 10% of a run's images (see steady_rate)
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


@dataclass
class RunClock:
    """Wall time of the run, time to the first committed shard, steady-state rate, seconds per stage."""

    start: float = field(default_factory=time.perf_counter)
    first_commit: float | None = None
    first_inputs: int = 0
    last_commit: float | None = None
    inputs: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    span: list[float] = field(default_factory=list)
    shards: list[tuple[float, float, int]] = field(default_factory=list)  # (forward start, end, inputs)
    commits: int = 0  # groups of shards committed (see commit_groups)

    def record(self, result: ShardResult, commit_seconds: float) -> None:
        now = time.perf_counter()
        if self.first_commit is None:
            self.first_commit, self.first_inputs = now, result.inputs
        self.last_commit = now
        self.inputs += result.inputs
        if result.span:
            old = self.span or result.span
            self.span = [min(old[0], result.span[0]), max(old[1], result.span[1])]
            self.shards.append((result.span[0], result.span[1], result.inputs))
        for stage, seconds in {**result.seconds, "commit": commit_seconds}.items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def timings(self) -> dict[str, float]:
        out = {"embed": round(time.perf_counter() - self.start, 3), "commits": self.commits}
        if self.first_commit is None:
            return out
        out["first_row_s"] = round(self.first_commit - self.start, 3)
        if self.span and self.span[1] > self.span[0]:
            # from the first forward to the last, over every actor; startup (Ray, worker imports, model
            # load) is before it, and waiting on decode or writes inside it counts
            out["forward_span_s"] = round(self.span[1] - self.span[0], 3)
            out["span_images_per_s"] = round(self.inputs / (self.span[1] - self.span[0]), 2)
            steady = steady_rate(self.shards)
            if steady is not None:
                out["steady_images_per_s"] = round(steady, 2)
        out.update({f"stage.{k}": round(v, 3) for k, v in sorted(self.stages.items())})
        return out


def commit_groups(
    results: Iterable[ShardResult], every_s: float = COMMIT_EVERY_S
) -> Iterator[list[ShardResult]]:
    """RESULTS gathered into commits: a shard arriving EVERY_S after the last commit ended is committed
    at once with whatever waited; earlier ones wait for the next shard (or the run's end).

    A slow tower (a shard every few seconds) commits each shard as it arrives, as before; a fast one
    (dozens of shards a second) pays a commit's fixed cost once a second instead of once a shard.
    """
    pending: list[ShardResult] = []
    last = float("-inf")
    for result in results:
        pending.append(result)
        if time.monotonic() - last >= every_s:
            yield pending
            pending, last = [], time.monotonic()  # resumed after the commit: it ended now
    if pending:
        yield pending


def steady_rate(shards: list[tuple[float, float, int]], trim: float = STEADY_TRIM) -> float | None:
    """Images/s between the moments when TRIM and 1 - TRIM of SHARDS' images were embedded.

    The rate a long run settles at: a short run's forward span also holds the ramp-up (actors start
    one after another, the first blocks are still decoding) and the drain (actors run out of work one
    by one), which a million-image run amortises. Each shard is taken to progress evenly over its own
    (forward start, end, inputs); idle time inside the window (an actor starved of decoded images)
    counts. None when the window is empty.
    """
    total = sum(n for _, _, n in shards)
    if not total:
        return None
    low, high = trim * total, (1 - trim) * total
    times = _crossings(shards, [low, high])
    if len(times) < 2 or times[1] <= times[0]:
        return None
    return (high - low) / (times[1] - times[0])


def _crossings(shards: list[tuple[float, float, int]], targets: list[float]) -> list[float]:
    """When the count of embedded images (linear inside each shard's span) reaches each of TARGETS."""
    events: list[tuple[float, float, float]] = []  # (time, change of slope, jump)
    for start, end, n in shards:
        if end > start:
            events += [(start, n / (end - start), 0.0), (end, -n / (end - start), 0.0)]
        else:
            events.append((start, 0.0, float(n)))
    events.sort()
    pending = sorted(targets)
    out: list[float] = []
    done, slope, now = 0.0, 0.0, events[0][0] if events else 0.0
    for t, change, jump in events:
        reach = done + slope * (t - now)
        while pending and reach >= pending[0] and slope > 0:
            out.append(now + (pending.pop(0) - done) / slope)
        done, now = reach + jump, t
        while pending and done >= pending[0]:
            pending.pop(0)
            out.append(t)
        slope += change
    return out


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
