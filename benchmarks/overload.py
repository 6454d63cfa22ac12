"""Overload (issue 5, point 7): a burst of 10x the sustainable rate against a real daemon.

    .venv/bin/python -m benchmarks.overload [--seconds S] [--connections N] [--factor F]

Starts ``facetrt serve`` (a separate process, fresh data directory, loopback, default
limits) and then, in one run:

1. **sustainable rate**: ``benchmarks._daemon_util``'s closed-loop raw generator (8
   connections x 128 calls in flight on one ``Counter`` facet, as P1 of
   ``benchmarks.daemon``) measures the rate S the node completes durable increments at;
2. **open-loop load** from this process over ``--connections`` raw-protocol connections,
   three phases of ``--seconds`` each: *before* at 0.5 S, *burst* at ``--factor`` (10) x S,
   *after* at 0.5 S. Calls are due on schedule whatever the answers (pre-built frames, one
   ``send_all`` per 2 ms tick per connection); like a well-behaved client, a connection
   keeps at most the server's ``inflight`` (256) calls unanswered, so calls wait on the
   client's side when the server is slow, and calls more than ``BACKLOG_MAX`` behind
   schedule, or left when their phase ends, are dropped by the client (as a caller gives
   up). Latency is measured from a call's send, so it is what the node adds. During the
   burst, ``HTTP_CLIENTS`` HTTP clients call the same facet in a loop, to see the
   gateway's answers;
3. **memory**: the daemon's RSS (``/proc/<pid>/status``) every 50 ms.

Reported per phase: offered, sent, admitted (``ok``) and shed (``overloaded``) rates, other
errors, admitted-call latency p50 / p99, the largest RSS; the admitted rate per 0.5 s slice
after the burst (recovery); and the memory bound derived from the configured limits (see
``memory_bound``). Writes ``benchmarks/results/overload-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import os
import struct
import sys
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx
import msgpack
import trio

from facetrt.config import RuntimeConfig, ServerConfig
from facetrt.protocol import encode_frame

from ._daemon_util import RECEIVE_BYTES_MAX, Spec, _handshake
from ._util import (
    Latency,
    describe_load,
    load_snapshot,
    machine_info,
    scratch_dir,
    write_result,
)
from .daemon import HOST, Generator, running_daemon

if TYPE_CHECKING:
    from ._util import JsonValue
    from .daemon import Daemon

AGENT: Final = "burst-counter"
PHASES: Final = ("before", "burst", "after")
TICK_SECONDS: Final = 0.002
BACKLOG_MAX: Final = 4096  # calls a connection may be behind schedule before it drops some
ID_BASE: Final = 2**32  # ids of one msgpack size: every frame of a connection has one length
HTTP_CLIENTS: Final = 8
WINDOW: Final = 256  # the daemon's default calls_in_flight_max, as its welcome tells clients
RSS_SECONDS: Final = 0.05
CALL_BYTES_ESTIMATE: Final = 4096  # memory of one small call held by the node (generous)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_bound(idle_rss: int, connections: int, facets: int) -> tuple[int, str]:
    """What the node may hold beyond its idle RSS under any load of small calls, from the
    configured limits: per connection one read buffer and ``calls_in_flight_max`` calls
    (the reader stops there; their replies count until written), per facet
    ``mailbox_envelopes_max`` queued calls, each call at most ``CALL_BYTES_ESTIMATE``."""
    server, runtime = ServerConfig(), RuntimeConfig()
    per_connection = RECEIVE_BYTES_MAX + server.calls_in_flight_max * CALL_BYTES_ESTIMATE
    per_facet = runtime.mailbox_envelopes_max * CALL_BYTES_ESTIMATE
    bound = idle_rss + connections * per_connection + facets * per_facet
    text = (
        f"idle RSS {idle_rss / 2**20:.1f} MiB + {connections} connections x "
        f"({RECEIVE_BYTES_MAX // 1024} KiB read buffer + {server.calls_in_flight_max} calls "
        f"in flight x {CALL_BYTES_ESTIMATE // 1024} KiB) + {facets} facet x "
        f"{runtime.mailbox_envelopes_max} queued x {CALL_BYTES_ESTIMATE // 1024} KiB "
        f"= {bound / 2**20:.1f} MiB"
    )
    return bound, text


@dataclass(slots=True)
class Phase:
    name: str
    start: float  # perf_counter
    end: float
    rate: float  # offered calls/s, all connections
    offered: int = 0
    sent: int = 0
    dropped: int = 0
    replies: Tally[str] = field(default_factory=Tally)
    latencies: list[float] = field(default_factory=list)  # admitted calls, seconds
    rss_max: int = 0
    http: Tally[str] = field(default_factory=Tally)


@dataclass(slots=True)
class Load:
    phases: list[Phase]
    ok_times: list[float] = field(default_factory=list)  # completion times of admitted calls

    def phase_at(self, moment: float) -> Phase | None:
        for phase in self.phases:
            if phase.start <= moment < phase.end:
                return phase
        return None


def _frames(key_agent: str, count: int) -> tuple[bytes, int]:
    """``count`` call frames with ids ID_BASE.., concatenated, and the length of one."""
    body = {"t": "call", "agent": key_agent, "method": "increment", "args": [], "kwargs": {}}
    body["class"] = "Counter"
    sample = encode_frame({**body, "id": ID_BASE})
    prefix = encode_frame({**body, "id": 0})[:-1]  # ends with the id key; id 0 is one byte
    packb = msgpack.packb
    header = struct.pack(">I", len(sample) - 4)
    head = prefix[4:]
    frames = b"".join(header + head + packb(ID_BASE + index) for index in range(count))
    assert frames[: len(sample)] == sample, "frame template differs from encode_frame"
    return frames, len(sample)


async def _connection(daemon: Daemon, load: Load, share: float) -> None:
    last = load.phases[-1]
    count = int(sum(phase.rate * share * (phase.end - phase.start) for phase in load.phases)) + 16
    frames, length = _frames(AGENT, count)
    stream = await trio.open_tcp_stream(HOST, daemon.tcp_port)
    async with stream:
        buffer = await _handshake(stream, daemon.key)
        sends: list[int] = []  # first index of each send
        send_times: list[float] = []
        state = {"next": 0, "sent": 0, "answered": 0}

        async def sender() -> None:
            clock = time.perf_counter
            while (now := clock()) < last.end:
                phase = load.phase_at(now)
                if phase is None:
                    await trio.sleep(TICK_SECONDS)
                    continue
                # Calls of an earlier phase not sent by its end are given up (dropped there).
                phase_first = _due(load, share, phase.start)
                if state["next"] < phase_first:
                    previous = load.phases[load.phases.index(phase) - 1]
                    previous.dropped += phase_first - state["next"]
                    state["next"] = phase_first
                due = _due(load, share, now)
                backlog = due - state["next"]
                if backlog > BACKLOG_MAX:  # far behind schedule: drop, as a caller gives up
                    skipped = backlog - BACKLOG_MAX
                    phase.dropped += skipped
                    state["next"] += skipped
                # A well-behaved client keeps at most the server's `inflight` unanswered.
                room = WINDOW - (state["sent"] - state["answered"])
                allowed = min(due, count, state["next"] + room)
                if allowed > state["next"]:
                    first, last_index = state["next"], allowed
                    state["sent"] += last_index - first
                    sends.append(first)
                    send_times.append(now)
                    state["next"] = last_index
                    phase.sent += last_index - first
                    await stream.send_all(frames[first * length : last_index * length])
                await trio.sleep(TICK_SECONDS)

        async def receiver() -> None:
            nonlocal buffer
            unpackb = msgpack.unpackb
            clock = time.perf_counter
            while True:
                with trio.move_on_after(max(0.5, last.end + 2.0 - clock())):
                    data = await stream.receive_some(RECEIVE_BYTES_MAX)
                if not data or clock() > last.end + 2.0:
                    return
                now = clock()
                buffer += data
                offset = 0
                while len(buffer) - offset >= 4:
                    (size,) = struct.unpack_from(">I", buffer, offset)
                    if len(buffer) - offset - 4 < size:
                        break
                    body = unpackb(bytes(buffer[offset + 4 : offset + 4 + size]))
                    offset += 4 + size
                    state["answered"] += 1
                    index = body.get("id", -ID_BASE) - ID_BASE
                    at = bisect.bisect_right(sends, index) - 1
                    sent_at = send_times[at] if at >= 0 else now
                    phase = load.phase_at(sent_at)
                    if phase is None:
                        continue
                    code = "ok" if body["t"] == "result" else str(body.get("code"))
                    phase.replies[code] += 1
                    if code == "ok":
                        phase.latencies.append(now - sent_at)
                        load.ok_times.append(now)
                del buffer[:offset]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)


def _due(load: Load, share: float, now: float) -> int:
    """Calls a connection should have sent by ``now``."""
    total = 0.0
    for phase in load.phases:
        if now <= phase.start:
            break
        total += phase.rate * share * (min(now, phase.end) - phase.start)
    return int(total)


async def _http_client(daemon: Daemon, load: Load) -> None:
    burst = load.phases[1]
    url = f"http://{HOST}:{daemon.http_port}/v1/facets/bench/{AGENT}/increment"
    headers = {"Authorization": f"Bearer {daemon.key}"}
    await trio.sleep(max(0.0, burst.start - time.perf_counter()))
    async with httpx.AsyncClient(timeout=30) as client:
        while time.perf_counter() < burst.end:
            response = await client.post(url, json={"class": "Counter"}, headers=headers)
            if response.status_code == 200:
                burst.http["200 ok"] += 1
            else:
                error = response.json()["error"]
                retry = response.headers.get("retry-after")
                label = f"{response.status_code} {error['code']} retryable={error['retryable']}"
                burst.http[label + (f" retry-after={retry}" if retry else "")] += 1


async def _open_loop(daemon: Daemon, load: Load, connections: int) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(_connection, daemon, load, 1 / connections)
        for _ in range(HTTP_CLIENTS):
            nursery.start_soon(_http_client, daemon, load)


def _sample_rss(pid: int, load: Load, stop: threading.Event) -> None:
    while not stop.wait(RSS_SECONDS):
        with contextlib.suppress(OSError):
            rss = rss_bytes(pid)
            phase = load.phase_at(time.perf_counter())
            if phase is not None:
                phase.rss_max = max(phase.rss_max, rss)


def sustainable_rate(daemon: Daemon, seconds: float) -> tuple[float, Latency]:
    with contextlib.closing(Generator()) as generator:
        spec = Spec(
            kind="raw",
            host=HOST,
            port=daemon.tcp_port,
            key=daemon.key,
            agent=AGENT,
            connections=8,
            window=128,
            warmup_s=0.5,
            seconds=seconds,
            server_pid=daemon.pid,
        )
        window = generator.run(spec)
    return window.rate, Latency.of(window.latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="one phase (default 4)")
    parser.add_argument("--connections", type=int, default=16, help="open-loop connections")
    parser.add_argument("--factor", type=float, default=10.0, help="burst / sustainable rate")
    parser.add_argument(
        "--handler-ms",
        type=float,
        default=None,
        help="serve a Counter whose increment first awaits this long (a slow agent handler), "
        "so that 10x its sustainable rate is within one generator's reach",
    )
    parser.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    options = parser.parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(scratch_dir(None, "overload"))
        extra: tuple[str, ...] = ()
        if options.handler_ms is not None:
            os.environ["BENCH_HANDLER_MS"] = str(options.handler_ms)  # the daemon inherits it
            config = root / "facetrt.toml"
            config.write_text('[classes]\nCounter = "benchmarks._slow_facets:SlowCounter"\n')
            extra = ("--config", str(config))
        daemon = stack.enter_context(running_daemon(root, extra))
        machine = machine_info(root)
        load_start = load_snapshot()
        print(f"overload over loopback; {describe_load(load_start)}", flush=True)
        time.sleep(0.5)
        idle_rss = rss_bytes(daemon.pid)
        rate, closed_latency = sustainable_rate(daemon, options.seconds)
        print(
            f"sustainable: {rate:,.0f} calls/s closed-loop (p50 {closed_latency.p50 * 1e3:.2f} "
            f"ms, p99 {closed_latency.p99 * 1e3:.2f} ms)",
            flush=True,
        )
        start = time.perf_counter() + 1.5  # room to build the frames first
        length = options.seconds
        rates = (0.5 * rate, options.factor * rate, 0.5 * rate)
        load = Load(
            [
                Phase(name, start + i * length, start + (i + 1) * length, phase_rate)
                for i, (name, phase_rate) in enumerate(zip(PHASES, rates, strict=True))
            ]
        )
        for phase in load.phases:
            phase.offered = int(phase.rate * (phase.end - phase.start))
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(daemon.pid, load, stop))
        sampler.start()
        try:
            trio.run(_open_loop, daemon, load, options.connections)
        finally:
            stop.set()
            sampler.join()
        load_end = load_snapshot()
    bound, bound_text = memory_bound(idle_rss, options.connections + HTTP_CLIENTS, 1)
    return _report(
        options,
        rate,
        closed_latency,
        load,
        idle_rss,
        bound,
        bound_text,
        machine,
        load_start,
        load_end,
        stamp,
    )


def _report(
    options: argparse.Namespace,
    rate: float,
    closed_latency: Latency,
    load: Load,
    idle_rss: int,
    bound: int,
    bound_text: str,
    machine: dict[str, JsonValue],
    load_start: dict[str, JsonValue],
    load_end: dict[str, JsonValue],
    stamp: str,
) -> int:
    print(
        "\n| phase | offered/s | sent/s | dropped by client | admitted/s | shed/s "
        "(overloaded) | other errors | admitted p50 ms | admitted p99 ms | max RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    phases: dict[str, JsonValue] = {}
    for phase in load.phases:
        seconds = phase.end - phase.start
        latency = Latency.of(phase.latencies)
        others = {code: n for code, n in phase.replies.items() if code not in ("ok", "overloaded")}
        print(
            f"| {phase.name} | {phase.offered / seconds:,.0f} | {phase.sent / seconds:,.0f} | "
            f"{phase.dropped:,} | {phase.replies['ok'] / seconds:,.0f} | "
            f"{phase.replies['overloaded'] / seconds:,.0f} | {others or '-'} | "
            f"{latency.p50 * 1e3:.2f} | {latency.p99 * 1e3:.2f} | {phase.rss_max / 2**20:.1f} |"
        )
        phases[phase.name] = {
            "offered_per_second": phase.offered / seconds,
            "sent_per_second": phase.sent / seconds,
            "dropped_by_client": phase.dropped,
            "replies": {**phase.replies},
            "admitted_latency": latency.to_json(),
            "rss_max_bytes": phase.rss_max,
            "http": {**phase.http},
        }
    after = load.phases[2]
    slices = []
    moment = after.start
    while moment < after.end:
        slices.append(sum(1 for t in load.ok_times if moment <= t < moment + 0.5) / 0.5)
        moment += 0.5
    before_rate = load.phases[0].replies["ok"] / (load.phases[0].end - load.phases[0].start)
    after_rate = after.replies["ok"] / (after.end - after.start)
    rss_max = max(phase.rss_max for phase in load.phases)
    print(f"\nHTTP during the burst: {dict(load.phases[1].http)}")
    print(
        f"completions per 0.5 s slice after the burst (calls/s): "
        f"{', '.join(f'{value:,.0f}' for value in slices)}"
    )
    print(f"recovery: admitted rate after / before = {after_rate / before_rate:.2f}")
    print(
        f"memory: max RSS {rss_max / 2**20:.1f} MiB; bound {bound_text}: "
        f"{'PASS' if rss_max <= bound else 'FAIL'}"
    )
    print(f"load at the end: {describe_load(load_end)} (this benchmark's own load included)")
    result: dict[str, JsonValue] = {
        "benchmark": "benchmarks.overload",
        "machine": machine,
        "options": {
            "seconds": options.seconds,
            "connections": options.connections,
            "factor": options.factor,
            "handler_ms": options.handler_ms,
            "http_clients": HTTP_CLIENTS,
        },
        "sustainable_calls_per_second": rate,
        "sustainable_latency": closed_latency.to_json(),
        "phases": phases,
        "after_slices_calls_per_second": [*slices],
        "recovery_after_over_before": after_rate / before_rate,
        "idle_rss_bytes": idle_rss,
        "rss_max_bytes": rss_max,
        "rss_bound_bytes": bound,
        "rss_bound": bound_text,
        "load_start": load_start,
        "load_end": load_end,
    }
    if not options.no_json:
        write_result("overload", stamp, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
