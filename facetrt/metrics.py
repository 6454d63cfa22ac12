"""FacetrtMetrics: every Prometheus metric of the daemon, on an injected registry.

Names are ``facetrt_<subsystem>_<what>_<unit>``; label values come from closed sets (surface,
error code, outcome). Tenant and agent ids are never labels. Live state (open facets, queued
envelopes, commits) is read from ``Runtime.statistics()`` at scrape time by a collector.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .policy import EgressStatistics
    from .runtime import HistogramSnapshot, RuntimeStatistics

SURFACES = ("tcp", "http")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@final
class _RuntimeCollector(Collector):
    def __init__(self, statistics: Callable[[], RuntimeStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        gauges = {
            "facetrt_facets_open": ("Open activations (LMDB environments).", stats.open_facets),
            "facetrt_facets_idle": ("Open activations with no work.", stats.idle_facets),
            "facetrt_mailbox_envelopes": (
                "Envelopes queued in all mailboxes.",
                stats.queued_envelopes,
            ),
            "facetrt_mailbox_oldest_age_seconds": (
                "Age of the oldest message queued in any mailbox (0 when none is queued).",
                stats.mailbox_oldest_age_seconds,
            ),
            "facetrt_mailboxes_full": (
                "Mailboxes at their bound (shedding new messages).",
                stats.mailboxes_full,
            ),
            "facetrt_activations_waiting": (
                "Activations waiting for an open permit at open_facets_max.",
                stats.activations_waiting,
            ),
        }
        for name, (text, value) in gauges.items():
            yield GaugeMetricFamily(name, text, value=value)
        counters: dict[str, tuple[str, float]] = {
            "facetrt_activations": ("Facet activations.", stats.activations),
            "facetrt_passivations": ("Facet passivations.", stats.passivations),
            "facetrt_facet_resets": ("Facets reset after a storage failure.", stats.resets),
            "facetrt_commits": ("Durable LMDB commits.", stats.commits),
            "facetrt_committed_envelopes": (
                "Messages made durable (divide by commits for the batch size).",
                stats.committed_envelopes,
            ),
            "facetrt_commits_inline": (
                "Commits run on the loop thread because nothing else was ready to run.",
                stats.commits_inline,
            ),
            "facetrt_commit_failures": ("Failed commits.", stats.commit_failures),
            "facetrt_mailbox_overloaded": ("Messages shed by full mailboxes.", stats.overloaded),
            "facetrt_deactivations_cut_short": (
                "on_deactivate hooks cut short by their time limit.",
                stats.deactivations_cut_short,
            ),
        }
        for name, (text, total) in counters.items():
            yield CounterMetricFamily(name, text, value=total)
        refusals = CounterMetricFamily(
            "facetrt_refusals",
            "Calls refused by a quota or an overload bound, by reason (facets, facet_bytes, "
            "mailbox, mailbox_age, rate).",
            labels=["reason"],
        )
        for reason, count in stats.refusals.items():
            refusals.add_metric([reason], count)
        yield refusals
        yield _histogram(
            "facetrt_commit_batch_envelopes",
            "Messages made durable per commit (group-commit batch size).",
            stats.commit_batch_envelopes,
        )
        yield _histogram(
            "facetrt_commit_duration_seconds",
            "Time of one durable commit (writer thread, including fsync).",
            stats.commit_durations,
        )


def _histogram(name: str, text: str, snapshot: HistogramSnapshot) -> HistogramMetricFamily:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*snapshot.bounds, float("inf")), snapshot.counts, strict=True):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
    return HistogramMetricFamily(name, text, buckets=buckets, sum_value=snapshot.total)


@final
class CallStats:
    """Calls answered by (surface, code) and their latency by surface, without locks.

    prometheus-client's ``Counter.inc`` plus ``Histogram.observe`` cost ~1.6 µs per call (a
    lock and a Python bucket search each); every call is answered on the loop thread, so plain
    integers and one ``bisect`` (~0.3 µs) suffice, and the collector below turns them into the
    same ``facetrt_calls_total`` and ``facetrt_call_duration_seconds`` families at scrape time.
    """

    __slots__ = ("_buckets", "_counts", "_sums")

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        # Per surface: one count per bucket (not cumulative), the last one for +Inf.
        self._buckets = {surface: [0] * (len(LATENCY_BUCKETS) + 1) for surface in SURFACES}
        self._sums = dict.fromkeys(SURFACES, 0.0)

    def observe(self, surface: str, code: str, seconds: float) -> None:
        key = (surface, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is <=).
        self._buckets[surface][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sums[surface] += seconds

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "facetrt_calls",
            "Calls answered, by surface and outcome code ('ok' for success).",
            labels=["surface", "code"],
        )
        for (surface, code), count in sorted(self._counts.items()):
            calls.add_metric([surface, code], count)
        yield calls
        latency = HistogramMetricFamily(
            "facetrt_call_duration_seconds",
            "Time from a call's arrival to its reply, by surface.",
            labels=["surface"],
        )
        for surface, counts in self._buckets.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            latency.add_metric([surface], buckets, self._sums[surface])
        yield latency


@final
class _CallCollector(Collector):
    def __init__(self, stats: CallStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        return self._stats.collect()


@final
class _EgressCollector(Collector):
    """Egress attempts and the audit log; labels from closed sets, never a tenant."""

    def __init__(self, statistics: Callable[[], EgressStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        requests = CounterMetricFamily(
            "facetrt_egress_requests",
            "Outbound attempts (each redirect hop counts), by source (fetch, proxy), decision "
            "(allowed, denied) and reason (allowed, no_rule, scheme, host, path, address, "
            "secret, redirects, limit, credentials).",
            labels=["source", "decision", "reason"],
        )
        for (source, decision, reason), count in sorted(stats.decisions.items()):
            requests.add_metric([source, decision, reason], count)
        yield requests
        failures = CounterMetricFamily(
            "facetrt_egress_failures",
            "Allowed outbound requests that failed on the network, by kind (dns, connect, tls, "
            "protocol, timeout).",
            labels=["kind"],
        )
        for kind, count in sorted(stats.failures.items()):
            failures.add_metric([kind], count)
        yield failures
        audit = stats.audit
        counters: dict[str, tuple[str, float]] = {
            "facetrt_egress_response_bytes": (
                "Response body bytes handed back to facets and tools.",
                stats.response_bytes,
            ),
            "facetrt_audit_records": ("Audit records written (attempts).", audit.records),
            "facetrt_audit_commits": ("Durable audit-log commits (group commits).", audit.commits),
            "facetrt_audit_commit_seconds": (
                "Time spent in audit-log commits (fsync included).",
                audit.commit_seconds,
            ),
            "facetrt_audit_pruned": ("Audit records removed by retention.", audit.pruned),
            "facetrt_audit_failures": ("Failed audit-log commits.", audit.failures),
        }
        for name, (text, total) in counters.items():
            yield CounterMetricFamily(name, text, value=total)


@final
class FacetrtMetrics:
    """The daemon's metrics. Create one per daemon with its own registry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        statistics: Callable[[], RuntimeStatistics] | None = None,
        *,
        egress: Callable[[], EgressStatistics] | None = None,
    ) -> None:
        self.registry = registry
        self.calls = CallStats()
        registry.register(_CallCollector(self.calls))
        # The hot path's bound method, looked up once: observe_call(surface, code, seconds).
        self.observe_call = self.calls.observe
        self.connections = Gauge(
            "facetrt_connections_open", "Open client connections.", ["surface"], registry=registry
        )
        self.connections_accepted = Counter(
            "facetrt_connections_accepted",
            "Client connections accepted.",
            ["surface"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "facetrt_connections_refused",
            "Client connections refused at the connection limit (or while draining, tcp).",
            ["surface"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "facetrt_auth_failures",
            "Refused credentials, by surface.",
            ["surface"],
            registry=registry,
        )
        self.protocol_errors = Counter(
            "facetrt_protocol_errors",
            "Connections closed for a protocol violation.",
            registry=registry,
        )
        if statistics is not None:
            registry.register(_RuntimeCollector(statistics))
        if egress is not None:
            registry.register(_EgressCollector(egress))
        # Pre-create the label sets so a scrape shows zeros rather than nothing.
        for surface in SURFACES:
            self.connections.labels(surface)
            self.connections_refused.labels(surface)
            self.auth_failures.labels(surface)
