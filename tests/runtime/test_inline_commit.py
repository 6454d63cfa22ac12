"""Commits on the loop thread when nothing else could run (``commit_inline_when_idle``).

The choice changes where the fsync runs, never what is durable: these tests pin when each path
is taken, and that both give the same state.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import trio
import trio.testing

from facetrt import RuntimeConfig, open_runtime
from facetrt.runtime._core import INLINE_BATCH_QUIET_SECONDS
from facetrt.testing import StoreHooks
from tests.facets import CLASSES, Gate
from tests.util import clock_held_during_store_jobs

if TYPE_CHECKING:
    from pathlib import Path

    from facetrt import Runtime


async def test_a_lone_call_commits_inline(data_dir: Path) -> None:
    async with open_runtime(data_dir, classes=CLASSES) as rt:
        for expected in range(1, 6):
            assert await rt.call("t", "c", "increment", cls="Counter") == expected
        stats = rt.statistics()
        assert stats.commits == 5
        assert stats.commits_inline == 5
    async with open_runtime(data_dir, classes=CLASSES) as rt:
        assert await rt.call("t", "c", "get") == 5  # durable like any other commit


async def test_concurrent_work_goes_to_the_writer_threads(data_dir: Path) -> None:
    async with open_runtime(data_dir, classes=CLASSES) as rt:

        async def increment(agent: str) -> None:
            await rt.call("t", agent, "increment", cls="Counter")

        async with trio.open_nursery() as nursery:
            for agent in range(8):
                for _ in range(20):
                    nursery.start_soon(increment, f"c{agent}")
        stats = rt.statistics()
        # The first commit may find the loop idle; those started while others were runnable
        # or in flight must not block the loop.
        assert stats.commits - stats.commits_inline >= 7
        for agent in range(8):
            assert await rt.call("t", f"c{agent}", "get") == 20


async def test_inline_commits_can_be_turned_off(data_dir: Path) -> None:
    config = RuntimeConfig(commit_inline_when_idle=False)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call("t", "c", "increment", cls="Counter")
        assert rt.statistics().commits_inline == 0


async def test_fault_hooks_keep_commits_on_the_writer_threads(data_dir: Path) -> None:
    hooks = StoreHooks(before_commit=lambda path: None)
    async with open_runtime(data_dir, classes=CLASSES, store_hooks=hooks) as rt:
        await rt.call("t", "c", "increment", cls="Counter")
        assert rt.statistics().commits_inline == 0


async def test_the_runnable_task_count_matches_trio_statistics() -> None:
    """``tasks_runnable_reader`` reads trio's run queue directly (the public statistics cost
    ~3 us per idle commit): it must count what trio's public figure counts, runnable or not."""
    from facetrt.runtime._core import tasks_runnable_reader

    runnable = tasks_runnable_reader()
    seen: list[tuple[int, int]] = []

    def compare() -> None:
        seen.append((runnable(), trio.lowlevel.current_statistics().tasks_runnable))

    async with trio.open_nursery() as nursery:
        compare()
        for _ in range(3):
            nursery.start_soon(trio.sleep, 0)
        compare()  # the three new tasks are ready to run, not yet started
        await trio.testing.wait_all_tasks_blocked()
        compare()
    assert seen[1][0] >= 3
    assert all(direct == public for direct, public in seen), seen


async def _gated_wake(rt: Runtime, tenant: str, agent: str) -> None:
    """One wake of four messages for ``agent`` (a blocked handler, three queued behind it)."""
    Gate.events[agent] = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(rt.call, tenant, agent, "wait_and_put", "w", 1))
        await trio.testing.wait_all_tasks_blocked()
        for index in range(3):
            nursery.start_soon(partial(rt.call, tenant, agent, "put", "k", index))
        await trio.testing.wait_all_tasks_blocked()
        Gate.events[agent].set()


async def test_a_batch_commits_inline_only_while_its_tenant_is_alone(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Decision 0009 as revised with 0018: a lone message may commit inline; a batch only
    while no other tenant submitted for INLINE_BATCH_QUIET_SECONDS (another tenant's calls
    must not wait for this tenant's fsync)."""
    async with open_runtime(data_dir, classes=CLASSES) as rt, clock_held_during_store_jobs(rt):
        await rt.call("a", "x", "put", "k", 0, cls="Gate")
        await rt.call("b", "y", "put", "k", 0, cls="Gate")
        await trio.sleep(INLINE_BATCH_QUIET_SECONDS + 0.5)  # "a" alone from here on
        await rt.call("a", "x", "put", "k", 0)
        await trio.sleep(INLINE_BATCH_QUIET_SECONDS + 0.5)
        before = rt.statistics()
        await _gated_wake(rt, "a", "x")
        alone = rt.statistics()
        assert (alone.commits - before.commits, alone.commits_inline - before.commits_inline) == (
            1,
            1,
        )
        assert alone.committed_envelopes - before.committed_envelopes == 4

        await rt.call("b", "y", "put", "k", 1)  # another tenant shows up: inline, a lone one
        shared = rt.statistics()
        assert shared.commits_inline - alone.commits_inline == 1
        await _gated_wake(rt, "a", "x")
        after = rt.statistics()
        assert (after.commits - shared.commits, after.commits_inline - shared.commits_inline) == (
            1,
            0,
        )
        assert after.committed_envelopes - shared.committed_envelopes == 4
