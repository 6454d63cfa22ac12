"""The contract of whatever runs store jobs (``StoreJobs``), for both implementations.

``StoreWorkers`` (writer threads, production) and the simulation's ``LoopStoreWorkers`` (the
loop thread, seeded: ``tests/sim``) must behave alike for the runtime: outcomes delivered after
``submit`` returned, never inside it; ``call`` bounded by ``jobs_max`` and never abandoning a
submitted job; ``stop`` finishing what was queued. A job is *held* in each one's own way: a
thread blocks on an event; a loop runner waits a delay in trio time that the test jumps over.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Protocol

import pytest
import trio
import trio.testing

from facetrt.runtime._storage_bridge import StoreWorkers
from tests.sim.workers import LoopStoreWorkers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import outcome

    from facetrt.runtime._storage_bridge import StoreJobs

HOLD_SECONDS = 100.0


class _Pool(Protocol):
    workers: StoreJobs

    def held(self, job: Callable[[], object]) -> Callable[[], object]:
        """``job``, made to wait until :meth:`release` before it runs."""

    def release(self) -> None: ...


class _ThreadPool:
    def __init__(self, jobs_max: int) -> None:
        self.workers: StoreJobs = StoreWorkers(2, jobs_max=jobs_max)
        self._gate = threading.Event()

    def held(self, job: Callable[[], object]) -> Callable[[], object]:
        def wait_then_run() -> object:
            assert self._gate.wait(10)
            return job()

        return wait_then_run

    def release(self) -> None:
        self._gate.set()


class _LoopPool:
    def __init__(self, nursery: trio.Nursery, jobs_max: int, clock: trio.testing.MockClock):
        self._delays: list[float] = []
        self._clock = clock
        self.workers: StoreJobs = LoopStoreWorkers(
            nursery, runners=2, jobs_max=jobs_max, delay=self._next_delay
        )

    def _next_delay(self) -> float:
        return self._delays.pop(0) if self._delays else 0.0

    def held(self, job: Callable[[], object]) -> Callable[[], object]:
        self._delays.append(HOLD_SECONDS)  # the next job taken waits that long
        return job

    def release(self) -> None:
        self._clock.jump(HOLD_SECONDS)


@pytest.fixture(params=["threads", "loop"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def _pool(
    kind: str, clock: trio.testing.MockClock, *, jobs_max: int = 65_536
) -> AsyncIterator[_Pool]:
    async with trio.open_nursery() as nursery:
        pool: _Pool = (
            _ThreadPool(jobs_max) if kind == "threads" else _LoopPool(nursery, jobs_max, clock)
        )
        pool.workers.start()
        try:
            yield pool
        finally:
            pool.release()
            await pool.workers.stop()


async def test_calls_wait_for_room_below_jobs_max(
    kind: str, mock_clock: trio.testing.MockClock
) -> None:
    order: list[str] = []
    async with _pool(kind, mock_clock, jobs_max=1) as pool:
        workers = pool.workers

        async def first() -> None:
            await workers.call(pool.held(lambda: order.append("first ran")))
            order.append("first")

        async def second() -> None:
            await workers.call(lambda: order.append("second ran"))
            order.append("second")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            # The second job was not handed over although a runner is idle: no room.
            assert order == []
            assert workers.jobs_in_flight == 1
            pool.release()
        # The first job ran before the second was handed over; the callers' own steps may
        # interleave with the second job either way.
        assert order[0] == "first ran"
        assert sorted(order) == ["first", "first ran", "second", "second ran"]


async def test_outcomes_arrive_after_submit_returns(
    kind: str, mock_clock: trio.testing.MockClock
) -> None:
    results: dict[str, outcome.Outcome[object]] = {}
    both = trio.Event()

    def record(name: str) -> Callable[[outcome.Outcome[object]], None]:
        def on_done(result: outcome.Outcome[object]) -> None:
            results[name] = result
            if len(results) == 2:
                both.set()

        return on_done

    def fail() -> object:
        raise ValueError("job failed")

    async with _pool(kind, mock_clock) as pool:
        pool.workers.submit(lambda: 42, record("value"))
        pool.workers.submit(fail, record("error"))
        busy = pool.workers.is_busy
        assert results == {}  # never delivered inside submit
        await both.wait()
        assert (busy, pool.workers.is_busy) == (True, False)
    assert results["value"].unwrap() == 42
    with pytest.raises(ValueError, match="job failed"):
        results["error"].unwrap()


async def test_call_returns_or_raises_the_job_result(
    kind: str, mock_clock: trio.testing.MockClock
) -> None:
    def fail() -> object:
        raise KeyError("missing")

    async with _pool(kind, mock_clock) as pool:
        assert await pool.workers.call(lambda: "done") == "done"
        with pytest.raises(KeyError):
            await pool.workers.call(fail)
        assert pool.workers.jobs_started == 2


async def test_cancellation_is_deferred_until_the_job_ends(
    kind: str, mock_clock: trio.testing.MockClock
) -> None:
    ran: list[str] = []
    async with _pool(kind, mock_clock) as pool:
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                await pool.workers.call(pool.held(lambda: ran.append("job")))
                ran.append("call returned")
                await trio.lowlevel.checkpoint()  # the deferred cancellation arrives here
            ran.append("caller saw the cancellation" if scope.cancelled_caught else "no")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert ran == []  # cancelled, but the job is not abandoned
            pool.release()
        assert ran == ["job", "call returned", "caller saw the cancellation"]


async def test_stop_lets_queued_jobs_finish(kind: str, mock_clock: trio.testing.MockClock) -> None:
    done: list[int] = []
    async with _pool(kind, mock_clock) as pool:
        for number in range(5):

            def job(number: int = number) -> int:
                return number

            pool.workers.submit(job, lambda result: done.append(result.unwrap()))
    assert sorted(done) == [0, 1, 2, 3, 4]


async def test_wait_submitted_returns_after_the_next_submit(
    kind: str, mock_clock: trio.testing.MockClock
) -> None:
    async with _pool(kind, mock_clock) as pool:
        seen: list[str] = []

        async def watcher() -> None:
            await pool.workers.wait_submitted()
            seen.append("submitted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == []
            await pool.workers.call(lambda: None)
        assert seen == ["submitted"]
