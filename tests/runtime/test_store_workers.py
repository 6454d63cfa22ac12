"""StoreWorkers: the writer-thread pool's bound on jobs in flight."""

from __future__ import annotations

import threading

import trio
import trio.testing

from facetrt.runtime._storage_bridge import StoreWorkers


async def test_calls_wait_for_room_below_jobs_max() -> None:
    workers = StoreWorkers(2, jobs_max=1)
    workers.start()
    release = threading.Event()
    order: list[str] = []

    async def first() -> None:
        await workers.call(lambda: release.wait(10))
        order.append("first")

    async def second() -> None:
        await workers.call(lambda: order.append("second ran"))
        order.append("second")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            # The second job was not handed to a thread although one is idle: no room.
            assert order == []
            assert workers.jobs_in_flight == 1
            release.set()
        assert order == ["first", "second ran", "second"]
    finally:
        await workers.stop()
