"""Overload you can see coming: the mailbox age bound, per-facet load in inspect, commit
histograms and the node's saturation report (embedded runtime, real LMDB)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from facetrt import OverloadedError, RuntimeConfig, open_runtime
from tests.facets import CLASSES, Gate
from tests.util import clock_held_during_store_jobs, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from facetrt import Runtime

TENANT = "acme"


async def _busy(rt: Runtime, agent: str, nursery: trio.Nursery) -> None:
    """Activate ``agent`` (a Gate) and leave it blocked in a handler until its event is set."""
    Gate.events[agent] = trio.Event()
    await rt.call(TENANT, agent, "put", "open", True, cls="Gate")
    nursery.start_soon(lambda: rt.call(TENANT, agent, "wait_and_put", "w", 0))
    await trio.testing.wait_all_tasks_blocked()


async def test_mailbox_age_bound_sheds_before_the_mailbox_fills(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A facet stuck for longer than mailbox_age_seconds_max refuses new calls although its
    mailbox has room; once it catches up it accepts them again."""
    config = RuntimeConfig(mailbox_age_seconds_max=5, commit_threads=2)
    results: list[object] = []

    async def put(key: str) -> None:
        results.append(await rt.call(TENANT, "g", "put", key, 1))

    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        async with trio.open_nursery() as nursery:
            await _busy(rt, "g", nursery)
            nursery.start_soon(put, "first")  # queued at t0
            await trio.sleep(4)
            nursery.start_soon(put, "within")  # the oldest has waited 4 s: accepted
            await trio.sleep(2)
            with pytest.raises(OverloadedError) as shed:
                await rt.call(TENANT, "g", "put", "late", 1)  # the oldest has waited 6 s
            assert shed.value.retryable is True
            assert "behind" in shed.value.message
            stats = rt.statistics()
            assert stats.queued_envelopes == 2
            assert stats.mailbox_oldest_age_seconds == pytest.approx(6)
            assert stats.refusals["mailbox_age"] == 1
            assert stats.refusals["mailbox"] == 0
            Gate.events["g"].set()
        assert await rt.call(TENANT, "g", "get", "late") is None
        assert await rt.call(TENANT, "g", "get", "within") == 1
        await rt.call(TENANT, "g", "put", "after", 1)  # caught up: accepted again
        assert rt.statistics().mailbox_oldest_age_seconds == 0.0


async def test_inspect_shows_a_busy_facets_load_without_queueing(
    rt: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await _busy(rt, "b", nursery)
        for index in range(3):
            nursery.start_soon(partial(rt.call, TENANT, "b", "put", f"k{index}", index))
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(2.5)
        seen = await rt.inspect(TENANT, "b")  # answered at once: the facet is busy
        assert seen["mailbox_depth"] == 3
        assert seen["mailbox_depth_max"] == rt.config.mailbox_envelopes_max
        assert seen["mailbox_oldest_age_seconds"] == pytest.approx(2.5)
        Gate.events["b"].set()
    seen = await rt.inspect(TENANT, "b")
    assert seen["mailbox_depth"] == 0
    assert seen["mailbox_oldest_age_seconds"] == 0.0
    batches = seen["recent_batch_envelopes"]
    seconds = seen["recent_commit_seconds"]
    assert isinstance(batches, list)
    assert isinstance(seconds, list)
    assert len(batches) == len(seconds) >= 2
    assert sum(b for b in batches if isinstance(b, int)) == 5  # open, wait_and_put, 3 puts


async def test_commit_histograms_count_every_commit(rt: Runtime) -> None:
    async with trio.open_nursery() as nursery:
        for index in range(40):
            call = partial(rt.call, TENANT, f"c{index % 4}", "increment", cls="Counter")
            nursery.start_soon(call)
    stats = rt.statistics()
    batches, durations = stats.commit_batch_envelopes, stats.commit_durations
    assert batches.count == durations.count == stats.commits
    assert batches.total == stats.committed_envelopes == 40
    assert sum(batches.counts) == stats.commits
    assert durations.total == pytest.approx(stats.commit_seconds)


async def test_saturation_reports_full_mailboxes_age_and_waiting_activations(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = RuntimeConfig(
        mailbox_envelopes_max=2,
        mailbox_age_seconds_max=10,
        open_facets_max=1,
        activation_wait_seconds_max=100,
        commit_threads=2,
    )
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        assert rt.saturation().saturated is False
        async with trio.open_nursery() as nursery:
            await _busy(rt, "s", nursery)
            nursery.start_soon(lambda: rt.call(TENANT, "s", "put", "a", 1))
            await trio.testing.wait_all_tasks_blocked()
            assert rt.saturation().reasons == ()
            await trio.sleep(5)  # half the age bound
            assert rt.saturation().reasons == ("mailbox_age",)
            nursery.start_soon(lambda: rt.call(TENANT, "s", "put", "b", 1))
            waiting = trio.CancelScope()  # a new facet waiting for the only open permit

            async def other() -> None:
                with waiting:
                    await rt.call(TENANT, "other", "increment", cls="Counter")

            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
            saturation = rt.saturation()
            assert saturation.saturated is True
            assert saturation.reasons == ("mailbox_age", "mailbox_full", "open_facets")
            assert (saturation.mailboxes_full, saturation.activations_waiting) == (1, 1)
            assert rt.statistics().activations_waiting == 1
            # Given up before the release: the autojump clock would otherwise skip to its
            # permit deadline while the release's commit runs on a writer thread.
            waiting.cancel()
            Gate.events["s"].set()
        # The eviction closes the store on a writer thread, then opens "other": virtual time
        # must not run out meanwhile.
        async with clock_held_during_store_jobs(rt):
            await wait_until(lambda: not rt.saturation().saturated)
