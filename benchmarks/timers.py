"""Timer throughput of the embedded runtime: timers set and fired per second across many facets.

    .venv/bin/python -m benchmarks.timers [--quick] [--facets N] [--workers N] [--dir D]

One timer per facet, default ``RuntimeConfig`` (``open_facets_max`` 1,000, so most facets are
passivated and must be woken from disk by the timer index):

A. set, new facets: each facet's first call sets a timer far in the future (creates its store);
B. set, existing facets: every timer is set again, due at one common instant ``D`` after the
   whole pass (replacing by name);
C. fire: from ``D`` until every ``on_timer`` has run (the scheduler wakes each facet from the
   node's timer index, most of them passivated);
D. fire after a restart: timers set again for ``D2``, the runtime closed, reopened after ``D2``:
   from the reopen until every timer has fired (every facet cold).

Rates are timers per second over the whole phase; latency is per ``set`` call (A, B) or from
due time to delivery (C, D). Writes ``benchmarks/results/timers-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from facetrt import Facet, RuntimeConfig, open_runtime, rpc

from ._util import (
    CaseResult,
    Latency,
    describe_load,
    is_busy,
    load_snapshot,
    machine_info,
    render_table,
    scratch_dir,
)

if TYPE_CHECKING:
    from facetrt import Runtime, Value

    from ._util import JsonValue

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TENANT = "bench"
FAR_SECONDS = 86_400.0


class Beeper(Facet):
    """One timer per facet; ``on_timer`` records when it ran (in-process, for the benchmark)."""

    fired: list[float] = []  # noqa: RUF012 - the benchmark's shared delivery log
    due_at = 0.0

    @rpc
    async def arm(self, at: float) -> None:
        self.timers.set("beep", at=at)

    async def on_timer(self, name: str, payload: Value, attempt: int) -> None:
        Beeper.fired.append(time.time())


CLASSES = {"Beeper": Beeper}


async def _set_all(rt: Runtime, agents: list[str], at: float, workers: int) -> list[float]:
    """Set one timer per agent from ``workers`` tasks; return each call's latency."""
    latencies: list[float] = []
    queue = iter(agents)

    async def worker() -> None:
        for agent in queue:
            started = time.perf_counter()
            await rt.call(TENANT, agent, "arm", at, cls="Beeper")
            latencies.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return latencies


async def _wait_fired(count: int, *, seconds: float) -> None:
    with trio.fail_after(seconds):
        while len(Beeper.fired) < count:
            await trio.sleep(0.01)


def _set_case(
    key: str, title: str, count: int, elapsed: float, latencies: list[float]
) -> CaseResult:
    return CaseResult(
        key=key,
        title=title,
        unit="timers/s",
        rates=[count / elapsed],
        latency=Latency.of(latencies),
        notes={"elapsed": f"{elapsed:.1f} s"},
    )


def _fire_case(key: str, title: str, count: int, started: float, due: float) -> CaseResult:
    last = max(Beeper.fired)
    elapsed = last - started
    return CaseResult(
        key=key,
        title=title,
        unit="timers/s",
        rates=[count / elapsed],
        latency=Latency.of([max(0.0, at - due) for at in Beeper.fired]),
        notes={"elapsed": f"{elapsed:.1f} s"},
    )


async def run(data_dir: Path, facets: int, workers: int) -> list[CaseResult]:
    agents = [f"beeper-{index}" for index in range(facets)]
    config = RuntimeConfig()
    results: list[CaseResult] = []
    Beeper.fired.clear()
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        started = time.perf_counter()
        latencies = await _set_all(rt, agents, time.time() + FAR_SECONDS, workers)
        elapsed = time.perf_counter() - started
        results.append(_set_case("set_new", "(A) set, new facets", facets, elapsed, latencies))
        print(f"  {results[-1].title}: {results[-1].median:,.0f} timers/s", flush=True)

        # Due after a pass of B at A's pace (B is faster: the stores exist), plus a margin.
        due = time.time() + elapsed + 2.0
        started = time.perf_counter()
        latencies = await _set_all(rt, agents, due, workers)
        elapsed = time.perf_counter() - started
        early = len(Beeper.fired)
        results.append(
            _set_case("set_existing", "(B) set, existing facets", facets, elapsed, latencies)
        )
        print(f"  {results[-1].title}: {results[-1].median:,.0f} timers/s", flush=True)
        await _wait_fired(facets, seconds=600)
        results.append(_fire_case("fire", "(C) fire, one per facet", facets, due, due))
        results[-1].notes["fired before all were set"] = str(early)
        print(f"  {results[-1].title}: {results[-1].median:,.0f} timers/s", flush=True)

        Beeper.fired.clear()
        due = time.time() + elapsed * 2 + 2.0
        await _set_all(rt, agents, due, workers)
    closed_at = time.time()
    await trio.sleep(max(0.0, due - time.time()) + 0.5)
    async with open_runtime(data_dir, classes=CLASSES, config=config):
        reopened = time.time()
        await _wait_fired(facets, seconds=600)
        results.append(
            _fire_case("fire_cold", "(D) fire after a restart, all cold", facets, reopened, due)
        )
        results[-1].notes["closed before due"] = f"{due - closed_at:.1f} s"
        print(f"  {results[-1].title}: {results[-1].median:,.0f} timers/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1,000 facets")
    parser.add_argument("--facets", type=int, default=None, help="facets (default 10,000)")
    parser.add_argument("--workers", type=int, default=256, help="concurrent callers")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory parent")
    parser.add_argument("--no-json", action="store_true")
    options = parser.parse_args()
    facets = options.facets or (1_000 if options.quick else 10_000)
    with scratch_dir(options.dir, "timers") as data_dir:
        machine = machine_info(data_dir)
        print(
            f"timers benchmark: {facets:,} facets, {options.workers} workers; "
            f"{describe_load(load_snapshot())}",
            flush=True,
        )
        started = time.perf_counter()
        results = trio.run(run, data_dir, facets, options.workers)
    end_load = load_snapshot()
    print()
    print(render_table(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; at the end: {describe_load(end_load)}")
    busy = is_busy(end_load)
    if busy:
        print("WARNING: the machine was busy with other work; these figures are unreliable")
    if not options.no_json:
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS_DIR / f"timers-{stamp}.json"
        report: dict[str, JsonValue] = {
            "machine": machine,
            "options": {"facets": facets, "workers": options.workers},
            "load_at_end": end_load,
            "machine_busy": busy,
            "cases": {result.key: result.to_json() for result in results},
        }
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
