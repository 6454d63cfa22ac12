"""Overhead of the mediated egress path: ``self.fetch`` versus the same httpx client used directly.

    .venv/bin/python -m benchmarks.egress [--quick] [--calls N] [--repeats N] [--dir D]

A local HTTP server (hypercorn, in a child process, answering ``GET /`` with 2 bytes) stands in
for an external API. The same sequence of GET requests runs, in one process and one run:

A. direct: one ``httpx.AsyncClient`` (keep-alive), no runtime, no policy, no audit;
B. ``self.fetch`` from facets of an embedded runtime, to an IP literal: one runtime call per
   request, the output gate, the policy decision, the durable audit record (fsync) before the
   request and its completion after, the pinned httpx transport (keep-alive per address);
C. as B, to the name ``localhost`` (one ``getaddrinfo`` per request, on a worker thread).

Each case runs with 1 caller and with 16 concurrent callers (B and C: one facet per caller,
since a facet handles one message at a time). Rates are requests per second; latency is per
request as the caller sees it; "cpu µs/req" is this process's CPU time (all threads) per
request, the figure least disturbed by other work on a shared machine. The audit notes show
writes per commit (group commit) and the mean commit time. Writes
``benchmarks/results/egress-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from facetrt import Facet, RuntimeConfig, open_runtime, rpc
from facetrt.policy import EgressConfig, EgressPolicy, open_egress

from ._util import (
    CaseResult,
    Latency,
    describe_load,
    is_busy,
    load_snapshot,
    machine_info,
    render_table,
    scratch_dir,
    write_result,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from facetrt import Runtime

    from ._util import JsonValue

TENANT = "bench"
CONCURRENCY = (1, 16)


class Getter(Facet):
    @rpc
    async def get(self, url: str) -> int:
        return (await self.fetch(url)).status


async def _upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def serve_upstream() -> None:
    """The child process: serve ``_upstream_app`` on a free loopback port; print it."""
    import hypercorn.config
    import hypercorn.trio

    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = 60

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, _upstream_app, config)
            print(binds[0].rpartition(":")[2], flush=True)

    trio.run(main)


async def _measure(
    calls: int, concurrency: int, request: Callable[[int], Awaitable[None]]
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    remaining = iter(range(calls))

    async def worker(index: int) -> None:
        for _ in remaining:
            started = time.perf_counter()
            await request(index)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(worker, index)
    return calls / (time.perf_counter() - started), latencies


async def _case(
    key: str,
    title: str,
    calls: int,
    repeats: int,
    concurrency: int,
    request: Callable[[int], Awaitable[None]],
) -> CaseResult:
    await _measure(min(200, calls), concurrency, request)  # warm-up: connections, activations
    rates: list[float] = []
    latencies: list[float] = []
    cpu = time.process_time()
    for _ in range(repeats):
        rate, samples = await _measure(calls, concurrency, request)
        rates.append(rate)
        latencies += samples
    cpu_per_request = (time.process_time() - cpu) / (calls * repeats)
    result = CaseResult(
        key=key, title=title, unit="req/s", rates=rates, latency=Latency.of(latencies)
    )
    # CPU of this process (every thread; the upstream is another process) per request: less
    # sensitive to other work on the machine than rates and latencies.
    result.notes["cpu µs/req"] = f"{cpu_per_request * 1e6:,.0f}"
    print(f"  {title}: {result.median:,.0f} req/s", flush=True)
    return result


async def run(data_dir: Path, calls: int, repeats: int, port: int) -> list[CaseResult]:
    results: list[CaseResult] = []
    direct_url = f"http://127.0.0.1:{port}/"
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:

        async def direct(index: int) -> None:
            response = await client.get(direct_url)
            assert response.status_code == 200

        for concurrency in CONCURRENCY:
            results.append(
                await _case(
                    f"direct_c{concurrency}",
                    f"(A) httpx directly, {concurrency} caller(s)",
                    calls,
                    repeats,
                    concurrency,
                    direct,
                )
            )
    policy = EgressPolicy.parse(
        {
            "allow": [
                {"host": "127.0.0.1", "schemes": ["http"], "ports": [port]},
                {"host": "localhost", "schemes": ["http"], "ports": [port]},
            ],
            "addresses": [{"address": "127.0.0.1"}, {"address": "::1"}],
        }
    )
    config = RuntimeConfig(commit_threads=4)
    async with (
        open_egress(data_dir, config=EgressConfig(), policies={TENANT: policy}) as egress,
        open_runtime(data_dir, classes={"Getter": Getter}, config=config, egress=egress) as rt,
    ):
        for host, label in (("127.0.0.1", "B"), ("localhost", "C")):
            url = f"http://{host}:{port}/"
            for concurrency in CONCURRENCY:
                before = egress.audit.statistics()
                results.append(
                    await _case(
                        f"fetch_{host}_c{concurrency}",
                        f"({label}) self.fetch to {host}, {concurrency} caller(s)",
                        calls,
                        repeats,
                        concurrency,
                        _fetcher(rt, url),
                    )
                )
                await egress.audit.wait_flushed()
                after = egress.audit.statistics()
                records = after.records - before.records
                commits = after.commits - before.commits
                seconds = after.commit_seconds - before.commit_seconds
                results[-1].notes["audit writes/commit"] = f"{2 * records / max(commits, 1):.1f}"
                results[-1].notes["commit ms"] = f"{1000 * seconds / max(commits, 1):.2f}"
    return results


def _fetcher(rt: Runtime, url: str) -> Callable[[int], Awaitable[None]]:
    async def request(index: int) -> None:
        status = await rt.call(TENANT, f"getter-{index}", "get", url, cls="Getter")
        assert status == 200

    return request


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="500 requests per repeat")
    parser.add_argument("--calls", type=int, default=None, help="requests per repeat (2,000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory parent")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_upstream:
        serve_upstream()
        return
    calls = options.calls or (500 if options.quick else 2_000)
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.egress", "--serve-upstream"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        with scratch_dir(options.dir, "egress") as data_dir:
            machine = machine_info(data_dir)
            print(
                f"egress benchmark: {calls:,} requests x {options.repeats}; "
                f"{describe_load(load_snapshot())}",
                flush=True,
            )
            started = time.perf_counter()
            results = trio.run(run, data_dir, calls, options.repeats, port)
    finally:
        child.terminate()
        child.wait(timeout=10)
    end_load = load_snapshot()
    print()
    print(render_table(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; at the end: {describe_load(end_load)}")
    busy = is_busy(end_load)
    if busy:
        print("WARNING: the machine was busy with other work; these figures are unreliable")
    if not options.no_json:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        report: dict[str, JsonValue] = {
            "machine": machine,
            "options": {"calls": calls, "repeats": options.repeats},
            "load_at_end": end_load,
            "machine_busy": busy,
            "cases": {result.key: result.to_json() for result in results},
        }
        write_result("egress", stamp, report)


if __name__ == "__main__":
    main()
