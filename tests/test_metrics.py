"""The lock-free call statistics expose what prometheus-client's own types would."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector

from facetrt.metrics import LATENCY_BUCKETS, SURFACES, FacetrtMetrics, _histogram
from facetrt.runtime._load import COMMIT_SECONDS_BUCKETS, CommitStats

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.core import Metric

observations = st.lists(
    st.tuples(
        st.sampled_from(SURFACES),
        st.sampled_from(["ok", "not_found", "overloaded"]),
        # Bounds themselves included: a value equal to a bound belongs to its bucket (le).
        st.sampled_from(LATENCY_BUCKETS) | st.floats(min_value=0, max_value=20),
    ),
    max_size=40,
)


def _samples(text: str, prefix: str) -> list[str]:
    return sorted(
        line for line in text.splitlines() if line.startswith(prefix) and "_created" not in line
    )


@settings(max_examples=100)
@given(observations)
def test_call_stats_match_prometheus_client(seen: list[tuple[str, str, float]]) -> None:
    ours = CollectorRegistry()
    metrics = FacetrtMetrics(ours)
    reference = CollectorRegistry()
    calls = Counter("facetrt_calls", "x", ["surface", "code"], registry=reference)
    latency = Histogram(
        "facetrt_call_duration_seconds",
        "x",
        ["surface"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    for surface in SURFACES:
        latency.labels(surface)  # ours shows every surface's histogram from the start
    for surface, code, seconds in seen:
        metrics.observe_call(surface, code, seconds)
        calls.labels(surface, code).inc()
        latency.labels(surface).observe(seconds)
    got = generate_latest(ours).decode()
    expected = generate_latest(reference).decode()
    for prefix in ("facetrt_calls_total", "facetrt_call_duration_seconds_"):
        if prefix.endswith("_"):
            # Sums may differ in the last bits (addition order is the same, but be safe).
            got_lines = [line for line in _samples(got, prefix) if "_sum" not in line]
            expected_lines = [line for line in _samples(expected, prefix) if "_sum" not in line]
            assert got_lines == expected_lines
        else:
            assert _samples(got, prefix) == _samples(expected, prefix)


@settings(max_examples=50)
@given(st.lists(st.sampled_from(COMMIT_SECONDS_BUCKETS) | st.floats(0, 10), max_size=40))
def test_commit_histogram_matches_prometheus_client(seen: list[float]) -> None:
    """The per-commit histograms (plain integers, rendered at scrape) expose what
    prometheus-client's own Histogram would."""
    commits = CommitStats()
    reference = CollectorRegistry()
    latency = Histogram(
        "facetrt_commit_duration_seconds", "x", buckets=COMMIT_SECONDS_BUCKETS, registry=reference
    )
    for seconds in seen:
        commits.observe(1, seconds)
        latency.observe(seconds)
    ours = CollectorRegistry()
    snapshot = commits.seconds.snapshot()
    ours.register(_Fixed(_histogram("facetrt_commit_duration_seconds", "x", snapshot)))
    prefix = "facetrt_commit_duration_seconds_"
    got = [line for line in _samples(generate_latest(ours).decode(), prefix) if "_sum" not in line]
    expected = [
        line for line in _samples(generate_latest(reference).decode(), prefix) if "_sum" not in line
    ]
    assert got == expected


class _Fixed(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterator[Metric]:
        yield self._metric
