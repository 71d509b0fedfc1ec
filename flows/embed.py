"""embed_corpus: plan -> embed on Ray actors -> commit -> index -> report, as a Prefect flow.

Entry points: `towerflow embed ...`, `python -m flows.embed ...` (what `ray job submit` runs) and
the deployment `flows/embed.py:embed_corpus` (deploy/prefect.yaml).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from storage.lake import Lake, new_run_id
from storage.lock import LakeLock
from tasks.commit import clean_staging, commit_list_errors, commit_shards, open_lake, refresh_indexes
from tasks.config import ModelSpec, RunConfig, default_ray_address, retry_unless_denied
from tasks.pipeline import ensure_ray, run_pipeline
from tasks.plan import ModelInfo, Plan, make_plan, model_info
from tasks.progress import RunClock, commit_groups
from tasks.report import new_manifest, report, save_manifest


@task(name="describe-models", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_denied)  # fmt: skip
def describe_models(cfg: RunConfig) -> dict[str, ModelInfo]:
    """Revision and preprocessing of every model, read from the checkpoints (no model is built)."""
    return {m.name: model_info(m, cfg.source_options) for m in cfg.models}


@task(name="plan", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_denied)  # fmt: skip
def plan_run(cfg: RunConfig, session, infos: dict[str, ModelInfo]) -> Plan:
    return make_plan(cfg, session.lake, infos)


def parse_models(
    model: str, weights: str, dtype: str | None, options: dict[str, Any]
) -> tuple[ModelSpec, ...]:
    """`--model a,b --weights W` (W holds a/ and b/), `--weights Wa,Wb`, or `--weights a=Wa,b=Wb`."""
    names = [n.strip() for n in model.split(",") if n.strip()]
    parts = [w.strip() for w in weights.split(",") if w.strip()]
    if all("=" in p and "://" not in p.split("=", 1)[0] for p in parts):
        mapping = dict(p.split("=", 1) for p in parts)
        missing = [n for n in names if n not in mapping]
        if missing:
            raise ValueError(f"no --weights given for {', '.join(missing)}")
    elif len(parts) == len(names):
        mapping = dict(zip(names, parts, strict=True))
    elif len(parts) == 1:
        mapping = {n: f"{parts[0].rstrip('/')}/{n}" for n in names}
    else:
        raise ValueError(
            f"{len(names)} models but {len(parts)} weights; give one per model or name=path pairs"
        )
    return tuple(ModelSpec(n, mapping[n], dtype, dict(options)) for n in names)


@flow(name="embed-corpus", log_prints=True)
def embed_corpus(
    source: str,
    out: str,
    model: str = "qwen2_5_vl",
    weights: str = "",
    dataset: str = "default",
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    batch_tokens: int | None = None,
    batch_images: int = 64,
    dtype: str | None = None,
    patches: bool = True,
    max_pixels: int | None = None,
    limit: int | None = None,
    ray_address: str | None = None,
    quiet: bool = False,
    source_options: dict[str, Any] | None = None,
    lake_options: dict[str, Any] | None = None,
    wait_lock: float = 0.0,
    compile_blocks: bool = False,
    buffer_mb: int | None = None,
) -> dict[str, Any]:
    """Embed every new or changed image of SOURCE into the lake OUT; returns the run summary.

    source_options / lake_options: fsspec options such as endpoint_url. Never put credentials here
    (flow parameters are stored by Prefect): they come from the environment / config chain.
    batch_tokens: token budget of one packed forward (None: 16384 on a GPU, 2048 on a CPU, where a
    forward's activations then stay in cache).
    wait_lock: seconds to wait while another run writes the lake (0: refuse at once).
    compile_blocks: torch.compile the packed towers' blocks in each actor (CUDA; ~7 s warm-up per
    actor, about 2x the Qwen2.5-VL-7B tower's throughput on an H100).
    buffer_mb: object-store memory for decoded inputs waiting for the actors and results waiting for
    the writer (default: 1024 MB per GPU actor, 256 MB per CPU actor); bounds memory at any corpus size.
    """
    options = {"max_pixels": max_pixels} if max_pixels else {}
    specs = parse_models(model, weights, dtype, options)
    cfg = RunConfig(
        source=source, lake=out, models=specs, dataset=dataset, actors=actors, gpus_per_actor=gpus_per_actor,
        batch_tokens=batch_tokens, batch_images=batch_images, patches=patches, limit=limit,
        ray_address=default_ray_address(ray_address),
        quiet=quiet, source_options=dict(source_options or {}), lake_options=dict(lake_options or {}),
        wait_lock=wait_lock, compile_blocks=compile_blocks, buffer_mb=buffer_mb,
    )  # fmt: skip
    return run_embed(cfg)


def run_embed(cfg: RunConfig) -> dict[str, Any]:
    """The flow's body for a prepared config (the CLI builds one with storage options)."""
    run_id = new_run_id()
    infos = describe_models(cfg)
    lock = LakeLock(Lake(cfg.lake, cfg.lake_options), run_id).acquire(cfg.wait_lock)
    if lock.took_over:
        print(lock.took_over)
    try:
        return _locked_run(cfg, run_id, infos, lock)
    finally:
        lock.release()


def _locked_run(cfg: RunConfig, run_id: str, infos: dict[str, ModelInfo], lock: LakeLock) -> dict[str, Any]:
    session = open_lake(cfg, infos, run_id)
    manifest = new_manifest(cfg, run_id, infos)
    save_manifest(session, manifest)
    t0 = time.perf_counter()
    plan = plan_run(cfg, session, infos)
    manifest.timings["plan"] = round(time.perf_counter() - t0, 3)
    if plan.list_errors:
        commit_list_errors(session, run_id, plan.list_errors)
    status = "failed"
    try:
        if plan.items:
            ensure_ray(cfg.ray_address, cfg.quiet)
        clock = RunClock()
        with tqdm(
            total=len(plan.items), unit="img", desc="embedding", disable=cfg.quiet or not plan.items
        ) as bar:
            for group in commit_groups(run_pipeline(cfg, run_id, plan.items, infos)):
                t1 = time.perf_counter()
                lock.check()
                commit_shards(session, group)
                clock.record(group, time.perf_counter() - t1)
                bar.update(sum(r.inputs for r in group))
                bar.set_postfix(errors=session.totals.rows.get("errors", 0), refresh=False)
        manifest.timings.update(clock.timings())
        clean_staging(session, run_id)
        status = "succeeded"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        manifest.finish(status)
        save_manifest(session, manifest)
    index = refresh_indexes(session)
    summary = report(cfg, session, manifest, plan, index)
    save_manifest(session, manifest)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.embed SOURCE --out LAKE ...`: the same arguments as `towerflow embed`."""
    from flows.cli import main as cli_main

    return cli_main(["embed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
