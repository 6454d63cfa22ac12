"""Overload over the real surfaces (issue 5, point 7), deterministically: no timing asserted.

A burst far larger than a facet can hold arrives while its handler is stuck (a ``Gate``), so
the outcome of every call is known in advance: one runs, ``mailbox_envelopes_max`` wait, the
rest are shed at once with ``overloaded`` (retryable) over TCP and over HTTP (429 with
``Retry-After``). Nothing grows past its bound meanwhile (the mailbox, the calls each
connection holds), no shed call runs, and once the facet is free again every call succeeds:
the node recovers by itself. ``benchmarks/overload.py`` measures the same under real load
(rates, latency, memory).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import trio
import trio.testing

from facetrt.protocol import Call, ErrorReply, Result
from tests.facets import Gate
from tests.security.surfaces import (
    Seen,
    TcpProbe,
    http_request,
    http_seen,
    running_node,
)
from tests.util import wait_until

if TYPE_CHECKING:
    from pathlib import Path

MAILBOX = 8
IN_FLIGHT = 16
CONNECTIONS = 4
BURST_PER_CONNECTION = 60  # 240 calls at a facet that holds 1 running + 8 queued
HTTP_BURST = 12
LIMITS = {
    "runtime.mailbox_envelopes_max": MAILBOX,
    "server.calls_in_flight_max": IN_FLIGHT,
    "classes": {"Gate": "tests.facets:Gate", "Counter": "facetrt.examples:Counter"},
}


async def test_a_burst_is_shed_with_retryable_overloaded_within_bounds_and_recovers(
    data_dir: Path,
) -> None:
    Gate.events["g"] = trio.Event()
    async with contextlib.AsyncExitStack() as stack:
        node = await stack.enter_async_context(running_node(data_dir, **LIMITS))
        runtime = node.daemon.runtime
        assert runtime is not None
        clients = [await TcpProbe.welcomed(node) for _ in range(CONNECTIONS)]
        assert await clients[0].call("g", "put", "open", 1, cls="Gate") == Seen(result=None)

        # The burst: every connection pipelines its calls in one write.
        sent: list[list[Call]] = []
        for number, client in enumerate(clients):
            calls = [
                Call(1000 + index, "g", "wait_and_put", [f"k{number}-{index}", 1])
                for index in range(BURST_PER_CONNECTION)
            ]
            sent.append(calls)
            await client.stream.send_all(b"".join(client.conn.send(call) for call in calls))

        # Shed calls are answered at once; the admitted ones wait for the gate.
        replies: list[dict[int, ErrorReply | Result]] = [{} for _ in clients]

        async def collect(number: int) -> None:
            while len(replies[number]) < BURST_PER_CONNECTION:
                event = await clients[number].receive()
                assert isinstance(event, (ErrorReply, Result)), event
                assert event.id is not None, event  # no connection-level error
                replies[number][event.id] = event

        admitted = 1 + MAILBOX
        total = CONNECTIONS * BURST_PER_CONNECTION
        nursery = await stack.enter_async_context(trio.open_nursery())
        for number in range(CONNECTIONS):
            nursery.start_soon(collect, number)
        await wait_until(lambda: sum(len(r) for r in replies) == total - admitted, seconds=30)
        shed = [reply for by_id in replies for reply in by_id.values()]
        assert all(isinstance(reply, ErrorReply) for reply in shed)
        assert {(r.code, r.retryable) for r in shed if isinstance(r, ErrorReply)} == {
            ("overloaded", True)
        }
        # Bounded: the facet holds one running and MAILBOX queued, nothing more anywhere.
        statistics = runtime.statistics()
        assert statistics.queued_envelopes == MAILBOX
        assert statistics.refusals["mailbox"] == total - admitted

        # HTTP meanwhile: shed the same way, with its status and Retry-After.
        answers: list[Seen] = []

        async def post() -> None:
            body = b'{"args": ["http", 1]}'
            request = http_request("/v1/facets/acme/g/put", node.keys["acme"], body)
            answers.append(await http_seen(node, request))

        async with trio.open_nursery() as nursery:
            for _ in range(HTTP_BURST):
                nursery.start_soon(post)
        assert {(a.status, a.code, a.retryable) for a in answers} == {(429, "overloaded", True)}

        # The facet gets going again: every admitted call completes, and only those ran.
        Gate.events["g"].set()
        await wait_until(lambda: sum(len(r) for r in replies) == total, seconds=30)
        results = [
            (number, reply.id)
            for number, by_id in enumerate(replies)
            for reply in by_id.values()
            if isinstance(reply, Result)
        ]
        assert len(results) == admitted
        checker = clients[0]
        for number, calls in enumerate(sent):
            for call in calls[:: BURST_PER_CONNECTION // 6]:
                ran = (number, call.id) in results
                expected = 1 if ran else None
                assert await checker.call("g", "get", call.args[0]) == Seen(result=expected)

        # Recovered: a second round at a pace the facet keeps up with is served in full.
        await wait_until(lambda: runtime.statistics().queued_envelopes == 0)
        for client in clients:
            for index in range(MAILBOX):
                assert await client.call("g", "put", f"after-{index}", 1) == Seen(result=None)
        request = http_request("/v1/facets/acme/g/put", node.keys["acme"], b'{"args": ["h", 1]}')
        answer = await http_seen(node, request)
        assert answer.status == 200
        await trio.testing.wait_all_tasks_blocked()
