"""The noisy neighbour (issue 5, point 6): does a quiet tenant keep its latency while another
floods the same daemon?

    .venv/bin/python -m benchmarks.noisy_neighbour [--seconds S] [--repeat N] [--quick]

Starts ``facetrt serve`` (a separate process, fresh data directory, loopback) with two
tenants. Tenant **B** (quiet) makes one durable ``Counter.increment`` at a time on its own
facet, from its own load-generator process. Tenant **A** (noisy) floods from another
load-generator process: pipelined raw-protocol connections keeping ``window`` calls in flight
each, on one facet or spread over many. Both generators are ``benchmarks._daemon_util``'s.

Cases, each repeat taking one window of every case in turn:

- ``alone``: B with nobody else (its unloaded latency: the yardstick);
- ``flood-1``: A floods one facet (8 connections x 128 in flight);
- ``flood-64``: A floods 64 facets (8 connections x 128, calls spread round-robin);
- ``flood-1-quota``: as ``flood-1`` with A under a per-tenant rate quota (decision 0010)
  of ``--quota`` calls/s (default: a quarter of A's unquota'd rate in the first repeat); A's
  generator ignores its ``quota_exceeded`` answers and sends the next call at once, as an
  abusive client would;
- ``flood-1-bounded``, ``flood-64-bounded``: as ``flood-1`` and ``flood-64`` with A's calls
  in flight across its connections bounded at ``--in-flight`` (the tenant quota
  ``calls_in_flight_max``: backpressure, nothing refused).

The target: B's p99 under each flood within 2x its p99 alone. Prints a table and PASS/FAIL
per case, and writes ``benchmarks/results/noisy-neighbour-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._daemon_util import Spec
from ._util import (
    Latency,
    describe_load,
    load_snapshot,
    machine_info,
    scratch_dir,
    write_result,
)
from .daemon import HOST, Generator, Window, running_daemon

if TYPE_CHECKING:
    from ._util import JsonValue
    from .daemon import Daemon

QUIET: Final = "quiet"
NOISY_CONNECTIONS: Final = 8
NOISY_WINDOW: Final = 128
TARGET_FACTOR: Final = 2.0


def admin(daemon: Daemon, method: str, path: str, body: dict[str, Any] | None) -> Any:
    """One admin API request (the key the daemon wrote on first start)."""
    key = (daemon.data_dir / "admin.key").read_text().strip()
    request = urllib.request.Request(
        f"http://{HOST}:{daemon.http_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
        return json.loads(response.read())


def set_quotas(daemon: Daemon, tenant: str, quotas: dict[str, float]) -> None:
    """Replace ``tenant``'s quota overrides (empty: the node defaults)."""
    admin(daemon, "PUT", f"/v1/admin/tenants/{tenant}/quotas", quotas)


@dataclass(slots=True)
class CaseRuns:
    name: str
    quiet: list[Window] = field(default_factory=list)
    noisy: list[Window] = field(default_factory=list)

    def quiet_latency(self) -> Latency:
        return Latency.of([s for window in self.quiet for s in window.latencies])

    def noisy_rate(self) -> float:
        calls = sum(window.calls for window in self.noisy)
        elapsed = sum(window.elapsed for window in self.noisy)
        return calls / elapsed if elapsed else 0.0

    def noisy_errors(self) -> dict[str, int]:
        errors: dict[str, int] = {}
        for window in self.noisy:
            for code, count in window.errors.items():
                errors[code] = errors.get(code, 0) + count
        return errors


@dataclass(slots=True)
class Bench:
    daemon: Daemon
    quiet_key: str
    quiet_generator: Generator
    noisy_generator: Generator
    seconds: float

    def quiet_spec(self, warmup: float) -> Spec:
        return Spec(
            kind="raw",
            host=HOST,
            port=self.daemon.tcp_port,
            key=self.quiet_key,
            agent="quiet-counter",
            connections=1,
            window=1,
            warmup_s=warmup,
            seconds=self.seconds,
            server_pid=self.daemon.pid,
        )

    def noisy_spec(self, agents: int) -> Spec:
        return Spec(
            kind="raw",
            host=HOST,
            port=self.daemon.tcp_port,
            key=self.daemon.key,
            agent="noisy",
            connections=NOISY_CONNECTIONS,
            window=NOISY_WINDOW,
            warmup_s=0.5,
            seconds=self.seconds + 1.0,  # covers the quiet window with room on both sides
            server_pid=self.daemon.pid,
            agents=agents,
        )

    def alone(self) -> Window:
        return self.quiet_generator.run(self.quiet_spec(warmup=0.3))

    def together(self, agents: int) -> tuple[Window, Window]:
        """A floods while B is measured inside A's window."""
        noisy: list[Window] = []
        thread = threading.Thread(
            target=lambda: noisy.append(self.noisy_generator.run(self.noisy_spec(agents)))
        )
        thread.start()
        quiet = self.quiet_generator.run(self.quiet_spec(warmup=1.0))
        thread.join()
        return quiet, noisy[0]


def run(options: argparse.Namespace) -> dict[str, JsonValue]:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    with scratch_dir(None, "noisy") as root:
        machine = machine_info(root)
        load_start = load_snapshot()
        print(f"noisy neighbour over loopback; {describe_load(load_start)}", flush=True)
        config = root / "facetrt.toml"
        config.write_text(f"[runtime]\nbatch_envelopes_max = {options.batch_envelopes_max}\n")
        with (
            running_daemon(root, ("--config", str(config))) as daemon,
            contextlib.closing(Generator()) as quiet_generator,
            contextlib.closing(Generator()) as noisy_generator,
        ):
            created = admin(daemon, "POST", "/v1/admin/tenants", {"tenant": QUIET})
            bench = Bench(daemon, created["key"], quiet_generator, noisy_generator, options.seconds)
            cases = {
                name: CaseRuns(name)
                for name in (
                    "alone",
                    "flood-1",
                    "flood-64",
                    "flood-1-quota",
                    "flood-1-bounded",
                    "flood-64-bounded",
                )
            }
            quota = options.quota
            for repeat in range(options.repeat):
                cases["alone"].quiet.append(bench.alone())
                for name, agents in (("flood-1", 1), ("flood-64", 64)):
                    quiet, noisy = bench.together(agents)
                    cases[name].quiet.append(quiet)
                    cases[name].noisy.append(noisy)
                if quota is None:
                    quota = round(cases["flood-1"].noisy_rate() / 4)
                for name, agents, quotas in (
                    ("flood-1-quota", 1, {"calls_per_second": quota}),
                    ("flood-1-bounded", 1, {"calls_in_flight_max": options.in_flight}),
                    ("flood-64-bounded", 64, {"calls_in_flight_max": options.in_flight}),
                ):
                    set_quotas(daemon, "bench", quotas)
                    quiet, noisy = bench.together(agents)
                    set_quotas(daemon, "bench", {})
                    cases[name].quiet.append(quiet)
                    cases[name].noisy.append(noisy)
                print(
                    f"  [{repeat + 1}/{options.repeat}] "
                    + ", ".join(
                        f"{name}: B p99 {_p99_ms(case.quiet[-1]):.2f} ms"
                        for name, case in cases.items()
                    ),
                    flush=True,
                )
        load_end = load_snapshot()
    return report(cases, quota, options, machine, load_start, load_end, stamp)


def _p99_ms(window: Window) -> float:
    return Latency.of(window.latencies).p99 * 1e3


def report(
    cases: dict[str, CaseRuns],
    quota: float | None,
    options: argparse.Namespace,
    machine: dict[str, JsonValue],
    load_start: dict[str, JsonValue],
    load_end: dict[str, JsonValue],
    stamp: str,
) -> dict[str, JsonValue]:
    alone = cases["alone"].quiet_latency()
    rows: dict[str, JsonValue] = {}
    print(
        f"\n| case | B calls | B p50 ms | B p99 ms | B p99 / alone | A calls/s | A errors | "
        f"target (p99 <= {TARGET_FACTOR:g}x alone) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        latency = case.quiet_latency()
        factor = latency.p99 / alone.p99
        passed = name == "alone" or factor <= TARGET_FACTOR
        errors = case.noisy_errors()
        print(
            f"| {name} | {latency.samples:,} | {latency.p50 * 1e3:.2f} | {latency.p99 * 1e3:.2f} "
            f"| {factor:.1f}x | {case.noisy_rate():,.0f} | {errors or '-'} | "
            f"{'-' if name == 'alone' else ('PASS' if passed else 'FAIL')} |"
        )
        rows[name] = {
            "quiet_latency": latency.to_json(),
            "quiet_p99_over_alone": factor,
            "noisy_calls_per_second": case.noisy_rate(),
            "noisy_errors": {**errors},
            "noisy_latency": Latency.of(
                [s for window in case.noisy for s in window.latencies]
            ).to_json(),
            "quiet_windows": [dataclasses.asdict(w) | {"latencies": None} for w in case.quiet],
            "passed": passed,
        }
    print(f"\nA's rate quota in flood-1-quota: {quota:,.0f} calls/s")
    print(f"A's calls_in_flight_max in the *-bounded cases: {options.in_flight}")
    print(f"load at the end: {describe_load(load_end)} (this benchmark's own load included)")
    result: dict[str, JsonValue] = {
        "benchmark": "benchmarks.noisy_neighbour",
        "machine": machine,
        "options": {
            "seconds": options.seconds,
            "repeat": options.repeat,
            "batch_envelopes_max": options.batch_envelopes_max,
            "noisy_connections": NOISY_CONNECTIONS,
            "noisy_window": NOISY_WINDOW,
        },
        "quota_calls_per_second": quota,
        "quota_calls_in_flight_max": options.in_flight,
        "cases": rows,
        "load_start": load_start,
        "load_end": load_end,
    }
    if not options.no_json:
        write_result("noisy-neighbour", stamp, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.noisy_neighbour",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="one window (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per case (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 s windows")
    parser.add_argument("--quota", type=float, default=None, help="A's rate quota, calls/s")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=32,
        help="A's calls_in_flight_max in the *-bounded cases (default 32)",
    )
    parser.add_argument(
        "--batch-envelopes-max",
        type=int,
        default=1024,
        help="runtime.batch_envelopes_max of the daemon (default 1024, the default)",
    )
    parser.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    options = parser.parse_args(argv)
    if options.quick:
        options.repeat, options.seconds = 1, 2.0
    started = time.perf_counter()
    run(options)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
