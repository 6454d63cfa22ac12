"""LoopStoreWorkers: store jobs run on the loop thread, so that one seed replays one schedule.

The runtime's ``StoreWorkers`` runs opens, commits and closes on real threads and hands each
outcome back with ``run_sync_soon``: when a job ends, relative to what the loop is doing, is up
to the OS scheduler, and trio's autojump clock jumps while a thread works (every task looks
blocked). Neither can be replayed from a seed. Here ``runners`` trio tasks play the threads:
each takes the next job (FIFO), may first wait a seeded delay in trio time (a slow disk, on
the mock clock), runs the job synchronously, and hands its outcome to ``on_done`` from the
task: after the job and never inside ``submit``, as with the threads. LMDB is content: every
job opens and ends its own transaction, so the thread that runs it does not matter, and
only one job runs at a time.

It passes the same contract tests as ``StoreWorkers`` (``tests/runtime/test_store_workers.py``).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, TypeVar, final

import outcome
import trio

from facetrt.runtime._storage_bridge import call_job

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")
_Job = tuple["Callable[[], object]", "Callable[[outcome.Outcome[object]], None]"]


@final
class LoopStoreWorkers:
    """``runners`` tasks in ``nursery`` that run store jobs on the loop thread.

    Args:
        nursery: where the runner tasks live; it must outlive every runtime using them (a
            simulated crash cancels the runtime, whose cleanup still needs its closes run).
        runners: how many jobs may wait out their delays at once (the writer threads).
        jobs_max: as ``StoreWorkers``: :meth:`call` waits while this many jobs are in flight.
        delay: seconds of trio time to wait before each job (slow storage); None: none.
        after_job: sees each job's outcome before ``on_done`` does and returns the one to
            deliver (the simulation's crash point; a deliberately broken runtime in tests).
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        runners: int = 2,
        jobs_max: int = 65_536,
        delay: Callable[[], float] | None = None,
        after_job: Callable[[outcome.Outcome[object]], outcome.Outcome[object]] | None = None,
    ) -> None:
        assert runners > 0
        self._nursery = nursery
        self._runner_count = runners
        self._jobs_max = jobs_max
        self._delay = delay
        self._after_job = after_job
        self._jobs: deque[_Job] = deque()
        self._work = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._submitted = trio.lowlevel.ParkingLot()
        self._running = 0
        self._stopped = trio.Event()
        self._stopping = False
        self.jobs_started = 0
        self.jobs_in_flight = 0

    def start(self) -> None:
        assert not self._running, "already started"
        for _ in range(self._runner_count):
            self._running += 1
            self._nursery.start_soon(self._run)

    async def stop(self) -> None:
        """Let queued jobs finish, then end the runner tasks."""
        self._stopping = True
        self._work.unpark_all()
        await self._stopped.wait()

    def submit(self, job: Callable[[], T], on_done: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue ``job``; ``on_done(outcome)`` runs from a runner task after it. Never
        checkpoints."""
        assert self._running, "LoopStoreWorkers not started"
        assert not self._stopping, "LoopStoreWorkers stopping"
        self.jobs_started += 1
        self.jobs_in_flight += 1
        self._jobs.append((job, on_done))  # type: ignore[arg-type]  # T is erased in the queue
        self._work.unpark()
        if self._submitted:
            self._submitted.unpark_all()

    @property
    def is_busy(self) -> bool:
        return self.jobs_in_flight > 0

    async def wait_submitted(self) -> None:
        await self._submitted.park()

    async def call(self, job: Callable[[], T]) -> T:
        """Run ``job`` and return (or raise) its result; once submitted, cancellation waits
        for the job (as ``StoreWorkers.call``: a store job is never abandoned)."""
        return await call_job(self, self._room, self._jobs_max, job)

    async def _run(self) -> None:
        try:
            while True:
                if not self._jobs:
                    if self._stopping:
                        return
                    await self._work.park()
                    continue
                job, on_done = self._jobs.popleft()
                delay = self._delay() if self._delay is not None else 0.0
                if delay > 0:
                    # Shielded: a job is never abandoned, whatever is cancelled meanwhile.
                    with trio.CancelScope(shield=True):
                        await trio.sleep(delay)
                result: outcome.Outcome[object] = outcome.capture(job)
                if self._after_job is not None:
                    result = self._after_job(result)
                self.jobs_in_flight -= 1
                if self._room and self.jobs_in_flight < self._jobs_max:
                    self._room.unpark()
                on_done(result)
                # One job per scheduling step, as a thread's completion arrives in a step of
                # its own: the tasks it woke run before this runner takes another job.
                await trio.lowlevel.checkpoint()
        finally:
            self._running -= 1
            if not self._running:
                self._stopped.set()
