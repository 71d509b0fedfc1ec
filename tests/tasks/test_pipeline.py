"""How a run sizes its embedding actors from the cluster's resources (no Ray needed: resources given)."""

from __future__ import annotations

import pytest

from tasks.config import ModelSpec, RunConfig
from tasks.pipeline import CPU_MAX_ACTORS, actor_sizing


def config(models: int = 1, **kw) -> RunConfig:
    specs = tuple(ModelSpec(name, "w") for name in ("dinov2", "qwen2_5_vl")[:models])
    return RunConfig(source="s", lake="l", models=specs, **kw)


@pytest.mark.parametrize(
    ("cpus", "models", "actors", "threads"),
    [(2, 1, 2, 1), (2, 2, 1, 1), (4, 1, 4, 1), (1, 1, 1, 1)]
    + [(16, 1, CPU_MAX_ACTORS, 2), (64, 2, CPU_MAX_ACTORS, 4)],
)
def test_cpu_nodes_get_single_threaded_actors_up_to_the_cap(cpus, models, actors, threads):
    s = actor_sizing(config(models), models, {"CPU": float(cpus)})
    assert (s.actors, s.threads, s.gpus_per_actor) == (actors, threads, 0.0)
    assert s.actors * models * s.cpus_per_actor <= max(cpus - 1, 0.25 * s.actors * models)  # a decode core


def test_gpu_nodes_get_one_actor_per_gpu_and_an_explicit_count_wins():
    s = actor_sizing(config(), 1, {"CPU": 16.0, "GPU": 4.0})
    assert (s.actors, s.gpus_per_actor, s.threads, s.cpus_per_actor) == (4, 1.0, 1, 1.0)
    assert actor_sizing(config(2), 2, {"CPU": 16.0, "GPU": 4.0}).actors == 2
    explicit = actor_sizing(config(actors=1), 1, {"CPU": 2.0})
    assert (explicit.actors, explicit.threads) == (1, 2)  # the older layout: one actor, every core's thread
