"""Small test helpers."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from facetrt import Runtime


async def wait_until(predicate: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Poll ``predicate`` until it holds.

    Needed where the runtime's writer threads are involved: they run in real time, which an
    autojump clock cannot see, so "after N virtual seconds" may still be mid-close.
    """
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)


WALL_CLOCK_BASE = 1_700_000_000.0


def trio_wall_clock() -> float:
    """A wall clock that moves with trio's clock, for timer tests under the autojump clock.

    The runtime persists timer due times on its wall clock and sleeps on trio's; passing this
    as ``open_runtime(wall_clock=...)`` keeps the two in step when trio's clock jumps.
    """
    return WALL_CLOCK_BASE + trio.current_time()


async def _hold_clock_while_store_jobs_run(rt: Runtime) -> None:
    workers = rt.core.workers
    while True:
        if workers.is_busy:
            await trio.lowlevel.checkpoint()  # runnable: the autojump clock stays put
        else:
            await workers.wait_submitted()


@contextlib.asynccontextmanager
async def clock_held_during_store_jobs(rt: Runtime) -> AsyncIterator[None]:
    """Keep trio's autojump clock from jumping while a writer thread works.

    The autojump clock jumps to the next deadline as soon as every task is blocked, and a task
    waiting for a writer thread looks blocked: virtual time would pass during each commit. While
    the runtime's writer threads have a job, a helper task stays runnable instead, so virtual
    time moves only when the runtime is really idle: timing in timer tests is deterministic.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold_clock_while_store_jobs_run, rt)
        yield
        nursery.cancel_scope.cancel()


def terminate(process: subprocess.Popen[bytes], seconds: float) -> int:
    """SIGTERM (a daemon drains, flushes and closes), SIGKILL if that takes longer than
    ``seconds``; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
