"""StoreWorkers: the writer threads that open, commit and close stores; the only thread hop.

Why not ``trio.to_thread.run_sync`` per commit: a round trip costs ~166 µs of loop time here,
which caps many small facets at ~2k commits/s while the disk can flush ~7.5k/s in parallel. A
fixed pool of threads fed through a ``queue.SimpleQueue`` costs one lock hand-off to submit
and one ``run_sync_soon`` to complete, and lets the fsyncs of different facets overlap.

A job is never abandoned: LMDB binds a write transaction to its thread and a half-done commit
must finish before its store can be used or closed, so :meth:`call` defers cancellation until
the job is done (like ``abandon_on_cancel=False``).
"""

from __future__ import annotations

import queue
import threading
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar, final

import outcome
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")
_STOP = None


class StoreJobs(Protocol):
    """What the runtime needs of whatever runs its store jobs (opens, commits, closes).

    :class:`StoreWorkers` in production. The seeded simulation (``tests/sim``) runs the jobs
    on the loop thread instead, so that one seed replays one schedule exactly; it passes the
    same contract tests (``tests/runtime/test_store_workers.py``).
    """

    jobs_started: int
    jobs_in_flight: int

    @property
    def is_busy(self) -> bool: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submit(
        self, job: Callable[[], T], on_done: Callable[[outcome.Outcome[T]], None]
    ) -> None: ...

    async def wait_submitted(self) -> None: ...

    async def call(self, job: Callable[[], T]) -> T: ...


async def call_job(
    jobs: StoreJobs, room: trio.lowlevel.ParkingLot, jobs_max: int, job: Callable[[], T]
) -> T:
    """``StoreJobs.call`` for any implementation: wait (cancellably) while ``jobs_max`` jobs
    are in flight (``room`` is unparked as they finish), submit, then wait for the result
    without abandoning the job: cancellation is deferred until it is done."""
    while jobs.jobs_in_flight >= jobs_max:
        await room.park()
    task = trio.lowlevel.current_task()

    def on_done(result: outcome.Outcome[T]) -> None:
        trio.lowlevel.reschedule(task, result)

    jobs.submit(job, on_done)

    def abort(_: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED

    value: T = await trio.lowlevel.wait_task_rescheduled(abort)
    return value


@final
class StoreWorkers:
    """A pool of ``threads`` writer threads; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, threads: int, *, jobs_max: int = 65_536) -> None:
        self._thread_count = threads
        # Commits (submit) are bounded by construction: one in flight per open facet. Other
        # jobs (opens, closes, data operations: call) wait for room below jobs_max.
        self._jobs_max = jobs_max
        self._room = trio.lowlevel.ParkingLot()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Callable[[object], None]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self.jobs_started = 0
        self.jobs_in_flight = 0  # submitted, completion not yet run on the loop thread
        self._submitted = trio.lowlevel.ParkingLot()

    def start(self) -> None:
        """Start the threads; must be called from the trio thread that will receive results."""
        self._token = trio.lowlevel.current_trio_token()
        for index in range(self._thread_count):
            thread = threading.Thread(target=self._work, name=f"facetrt-store-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def stop(self) -> None:
        """Let queued jobs finish, then end the threads."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        threads, self._threads = self._threads, []

        def join() -> None:
            for thread in threads:
                thread.join()

        await trio.to_thread.run_sync(join)

    def submit(self, job: Callable[[], T], on_done: Callable[[outcome.Outcome[T]], None]) -> None:
        """Run ``job`` on a writer thread, then ``on_done(outcome)`` on the trio thread.

        Never checkpoints; ``on_done`` runs from ``run_sync_soon`` and must not raise.
        """
        assert self._threads, "StoreWorkers not started"
        self.jobs_started += 1
        self.jobs_in_flight += 1
        self._jobs.put((job, partial(self._done, on_done)))
        if self._submitted:
            self._submitted.unpark_all()

    def _done(
        self, on_done: Callable[[outcome.Outcome[T]], None], result: outcome.Outcome[T]
    ) -> None:
        self.jobs_in_flight -= 1
        if self._room and self.jobs_in_flight < self._jobs_max:
            self._room.unpark()
        on_done(result)

    @property
    def is_busy(self) -> bool:
        """Whether a job is queued or running (its ``on_done`` has not run yet)."""
        return self.jobs_in_flight > 0

    async def wait_submitted(self) -> None:
        """Return after the next :meth:`submit`.

        For tests on trio's autojump clock: it sees every task blocked while a thread works
        and would jump; a test task that stays runnable while :attr:`is_busy` prevents that.
        """
        await self._submitted.park()

    async def call(self, job: Callable[[], T]) -> T:
        """Run ``job`` on a writer thread and return (or raise) its result.

        Waits first while ``jobs_max`` jobs are in flight (cancellable then). Once submitted,
        cancellation is deferred until the job finished: its result is returned and the
        caller's next checkpoint raises ``Cancelled``.
        """
        return await call_job(self, self._room, self._jobs_max, job)

    def _work(self) -> None:
        token = self._token
        assert token is not None
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job, on_done = item
            result = outcome.capture(job)
            try:
                token.run_sync_soon(on_done, result)
            except trio.RunFinishedError:  # pragma: no cover - the loop ended under us
                return
            # Drop our references now: an idle thread holding its last job would keep that
            # commit's whole batch (envelopes, replies, results) alive until its next job, and
            # 32 threads' worth of them drift into the GC's oldest generation.
            del item, job, on_done, result
