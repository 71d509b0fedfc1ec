"""How a run's shards are paced and measured: commit grouping, the run clock, its steady-state rate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tasks.pipeline import ShardResult

COMMIT_EVERY_S = 1.0  # a commit starts at most this long after the previous one ended (see commit_groups)
STEADY_TRIM = 0.1  # steady state leaves out the first and the last 10% of a run's images (see steady_rate)


@dataclass
class RunClock:
    """Wall time of the run, time to the first commit, steady-state rate, seconds per stage."""

    start: float = field(default_factory=time.perf_counter)
    first_commit: float | None = None
    inputs: int = 0
    commits: int = 0  # groups of shards committed (see commit_groups)
    stages: dict[str, float] = field(default_factory=dict)
    shards: list[tuple[float, float, int]] = field(default_factory=list)  # (forward start, end, inputs)

    def record(self, group: list[ShardResult], commit_seconds: float) -> None:
        """One commit of GROUP's shards, which took COMMIT_SECONDS (shared out evenly)."""
        if self.first_commit is None:
            self.first_commit = time.perf_counter()
        self.commits += 1
        for result in group:
            self.inputs += result.inputs
            if result.span:
                self.shards.append((result.span[0], result.span[1], result.inputs))
            for stage, seconds in {**result.seconds, "commit": commit_seconds / len(group)}.items():
                self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def timings(self) -> dict[str, float]:
        out = {"embed": round(time.perf_counter() - self.start, 3), "commits": self.commits}
        if self.first_commit is None:
            return out
        out["first_row_s"] = round(self.first_commit - self.start, 3)
        begin = min((s for s, _, _ in self.shards), default=0.0)
        end = max((e for _, e, _ in self.shards), default=0.0)
        if end > begin:
            # from the first forward to the last, over every actor; startup (Ray, worker imports, model
            # load) is before it, and waiting on decode or writes inside it counts
            out["forward_span_s"] = round(end - begin, 3)
            out["span_images_per_s"] = round(self.inputs / (end - begin), 2)
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
    An interrupt (Ctrl-C) while waiting for the next shard yields the waiting ones, then re-raises.
    """
    pending: list[ShardResult] = []
    last = float("-inf")
    try:
        for result in results:
            pending.append(result)
            if time.monotonic() - last >= every_s:
                yield pending
                pending, last = [], time.monotonic()  # resumed after the commit: it ended now
    except KeyboardInterrupt:
        if pending:  # Ctrl-C: what already arrived is committed before the run stops
            yield pending
        raise
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
