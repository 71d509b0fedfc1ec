"""Commit grouping and the run clock's rates (pure: shard spans given, no Ray)."""

from __future__ import annotations

import pytest

from tasks.pipeline import ShardResult
from tasks.progress import RunClock, commit_groups, steady_rate


def batches(start: float, count: int, seconds: float, images: int) -> list[tuple[float, float, int]]:
    """One actor's back-to-back batches: (forward start, end, images)."""
    return [(start + i * seconds, start + (i + 1) * seconds, images) for i in range(count)]


def test_steady_rate_leaves_out_ramp_up_and_drain_but_not_idle_time():
    # two actors at 5 images/s each (32-image batches of 6.4 s); the second starts 10 s late
    shards = batches(0.0, 16, 6.4, 32) + batches(10.0, 16, 6.4, 32)
    assert steady_rate(shards) == pytest.approx(10.0)
    whole = 1024 / (10.0 + 16 * 6.4)
    assert whole < 9.2  # the whole span's rate carries the late start and the drain
    # an actor starved of input for 20 s in the middle of the run: the steady rate shows it
    starved = batches(0.0, 8, 6.4, 32) + batches(8 * 6.4 + 20, 8, 6.4, 32) + batches(0.0, 16, 6.4, 32)
    assert steady_rate(starved) < 9.0


def test_steady_rate_takes_instant_shards_and_has_none_without_images():
    assert steady_rate([(float(t), float(t), 5) for t in range(4)]) == pytest.approx(16 / 3)
    assert steady_rate([]) is None and steady_rate([(1.0, 2.0, 0)]) is None


def test_run_clock_reports_the_steady_and_the_whole_span_rates():
    clock = RunClock()
    shards = [ShardResult(None, n, {}, 0, {"forward": 1.0}, [start, end])  # type: ignore[arg-type]
              for start, end, n in batches(100.0, 50, 2.0, 8) + batches(105.0, 50, 2.0, 8)]  # fmt: skip
    clock.record(shards[:1], 0.05)
    clock.record(shards[1:], 0.99)  # a group commit: its time is shared out over its shards
    t = clock.timings()
    assert t["commits"] == 2 and t["stage.commit"] == 1.04 and t["stage.forward"] == 100.0
    assert t["forward_span_s"] == 105.0 and t["span_images_per_s"] == round(800 / 105.0, 2)
    assert t["steady_images_per_s"] == pytest.approx(8.0, abs=0.01)  # both actors at 4 images/s


def test_commit_groups_commit_a_slow_stream_shard_by_shard_and_gather_a_fast_one():
    results = list(range(6))
    assert list(commit_groups(results, every_s=0.0)) == [[r] for r in results]  # a shard every few s
    # dozens a second: the first at once, the rest gathered until a commit is due (here: the end)
    assert list(commit_groups(results, every_s=3600.0)) == [[0], [1, 2, 3, 4, 5]]
    assert list(commit_groups([], every_s=1.0)) == []


def test_commit_groups_commit_the_waiting_shards_on_ctrl_c_then_stop():
    def interrupted():  # the pipeline's iterator, interrupted while waiting for its fourth shard
        yield from range(3)
        raise KeyboardInterrupt

    groups = commit_groups(interrupted(), every_s=3600.0)
    assert next(groups) == [0] and next(groups) == [1, 2]  # committed, not lost with the interrupt
    with pytest.raises(KeyboardInterrupt):
        next(groups)
