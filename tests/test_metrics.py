"""The lock-free call statistics expose what prometheus-client's own types would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from facetrt.metrics import LATENCY_BUCKETS, SURFACES, FacetrtMetrics

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
