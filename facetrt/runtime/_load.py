"""Load signals: commit histograms over all facets and each facet's recent commits.

Observed once per commit (never per call) with plain integers on the loop thread, like the
call statistics in ``metrics.py``: a ``bisect`` and two additions per histogram. Prometheus
sees them as histograms at scrape time (``facetrt_commit_batch_envelopes``,
``facetrt_commit_duration_seconds``). Per facet, the last :data:`RECENT_COMMITS` commits
(batch size, seconds) are kept in a bounded ring for ``facet inspect``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

if TYPE_CHECKING:
    from .._values import Value

# A batch holds at most batch_envelopes_max messages per wake-up, but consecutive wake-ups
# may share a commit: powers of two up to 4096 cover every configuration worth watching.
BATCH_ENVELOPES_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# An fsync takes 0.1 to 10 ms on a healthy disk; the tail shows a disk in trouble.
COMMIT_SECONDS_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
RECENT_COMMITS: Final = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class HistogramSnapshot:
    """A histogram's state: ``counts[i]`` observations in bucket ``i`` (not cumulative; the
    last one is +Inf), their ``total`` and their number ``count``."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    count: int


@final
class Histogram:
    """Observations counted into fixed buckets (``le`` semantics: a bound holds its value)."""

    __slots__ = ("_bounds", "_counts", "_total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        assert list(bounds) == sorted(bounds)
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(
            bounds=self._bounds,
            counts=tuple(self._counts),
            total=self._total,
            count=sum(self._counts),
        )


@final
class CommitStats:
    """Batch size and commit latency of every commit of the runtime."""

    __slots__ = ("batch_envelopes", "seconds")

    def __init__(self) -> None:
        self.batch_envelopes = Histogram(BATCH_ENVELOPES_BUCKETS)
        self.seconds = Histogram(COMMIT_SECONDS_BUCKETS)

    def observe(self, envelopes: int, seconds: float) -> None:
        self.batch_envelopes.observe(envelopes)
        self.seconds.observe(seconds)


def recent_commits() -> deque[tuple[int, float]]:
    """A facet's ring of its last commits: (envelopes, seconds), oldest first."""
    return deque(maxlen=RECENT_COMMITS)


def describe_recent(recent: deque[tuple[int, float]]) -> dict[str, Value]:
    """What ``facet inspect`` shows of a facet's recent commits (oldest first)."""
    batches: list[Value] = [envelopes for envelopes, _ in recent]
    seconds: list[Value] = [round(value, 6) for _, value in recent]
    return {"recent_batch_envelopes": batches, "recent_commit_seconds": seconds}
