"""Activation, passivation (idle and LRU), mailboxes and graceful close."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from facetrt import (
    Facet,
    OverloadedError,
    RuntimeConfig,
    UnavailableError,
    open_runtime,
    rpc,
)
from facetrt.storage import StoreHooks
from tests.facets import CLASSES, Gate
from tests.util import clock_held_during_store_jobs, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from facetrt import Runtime, Value

TENANT = "acme"


class SlowGoodbye(Facet):
    """Takes (virtual) time to deactivate, so messages arrive while it passivates."""

    deactivations = 0

    async def on_deactivate(self) -> None:
        self.storage.put("goodbye", True)
        await trio.sleep(1)
        SlowGoodbye.deactivations += 1

    @rpc
    async def put(self, key: str, value: Value) -> None:
        self.storage.put(key, value)

    @rpc
    async def get(self, key: str) -> Value:
        return self.storage.get(key)


class Stubborn(Facet):
    async def on_deactivate(self) -> None:
        await trio.sleep(3600)

    @rpc
    async def ping(self) -> str:
        return "pong"


async def test_idle_facet_passivates_and_reactivates_from_disk(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = RuntimeConfig(idle_timeout_seconds=30, commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        assert await rt.call(TENANT, "c", "increment", cls="Counter") == 1
        called_at = trio.current_time()
        assert rt.statistics().open_facets == 1
        async with clock_held_during_store_jobs(rt):  # the close runs in real time
            await wait_until(lambda: rt.statistics().passivations == 1, seconds=100)
        assert trio.current_time() - called_at >= 30
        assert rt.statistics().open_facets == 0
        assert await rt.call(TENANT, "c", "increment") == 2
        assert rt.statistics().activations == 2


async def test_lru_passivation_keeps_open_facets_at_the_bound(data_dir: Path) -> None:
    config = RuntimeConfig(open_facets_max=2, commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        for agent in ["a", "b", "c", "a", "d"]:
            await rt.call(TENANT, agent, "increment", cls="Counter")
            assert rt.statistics().open_facets <= 2
        # a was used, then b and c; c and d stay most recent.
        for agent, expected in [("a", 2), ("b", 1), ("c", 1), ("d", 1)]:
            assert await rt.call(TENANT, agent, "get") == expected
        assert rt.statistics().passivations >= 3


async def test_all_open_facets_busy_refuses_new_activation_with_overloaded(
    data_dir: Path,
) -> None:
    config = RuntimeConfig(open_facets_max=1, activation_wait_seconds_max=0.2, commit_threads=2)
    Gate.events["busy"] = trio.Event()
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call(TENANT, "busy", "put", "open", True, cls="Gate")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: rt.call(TENANT, "busy", "wait_and_put", "k", 1, cls="Gate"))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OverloadedError) as info:
                await rt.call(TENANT, "other", "increment", cls="Counter")
            assert info.value.retryable
            Gate.events["busy"].set()
        assert await rt.call(TENANT, "other", "increment", cls="Counter") == 1


async def test_messages_queued_during_passivation_are_handled_by_the_next_activation(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = RuntimeConfig(idle_timeout_seconds=10, commit_threads=2)
    SlowGoodbye.deactivations = 0
    async with open_runtime(data_dir, classes={"S": SlowGoodbye}, config=config) as rt:
        await rt.call(TENANT, "s", "put", "k", 0, cls="S")
        await trio.sleep(10.5)  # idle timeout passed: on_deactivate is running (1 s)
        assert rt.statistics().open_facets == 1
        # Virtual time must not jump 10 s while a writer thread closes, opens or commits (the
        # next activation would passivate too): hold the clock during store jobs.
        async with clock_held_during_store_jobs(rt):
            async with trio.open_nursery() as nursery:
                for index in range(1, 6):
                    nursery.start_soon(_put, rt, f"k{index}", index)
            for index in range(1, 6):
                assert await rt.call(TENANT, "s", "get", f"k{index}") == index
            assert await rt.call(TENANT, "s", "get", "goodbye") is True
        assert SlowGoodbye.deactivations == 1
        assert rt.statistics().activations == 2


async def _put(rt: Runtime, key: str, value: Value) -> None:
    await rt.call(TENANT, "s", "put", key, value)


async def test_on_deactivate_is_cut_short_and_counted(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = RuntimeConfig(idle_timeout_seconds=5, deactivate_seconds_max=2, commit_threads=2)
    async with open_runtime(data_dir, classes={"Stubborn": Stubborn}, config=config) as rt:
        assert await rt.call(TENANT, "s", "ping", cls="Stubborn") == "pong"
        async with clock_held_during_store_jobs(rt):  # the close runs in real time
            await wait_until(lambda: rt.statistics().passivations == 1, seconds=100)
        stats = rt.statistics()
        assert stats.open_facets == 0
        assert stats.deactivations_cut_short == 1


async def test_full_mailbox_sheds_with_overloaded_and_queues_nothing(data_dir: Path) -> None:
    config = RuntimeConfig(mailbox_envelopes_max=4, commit_threads=2)
    Gate.events["m"] = trio.Event()
    outcomes: list[object] = []

    async def put(index: int) -> None:
        try:
            outcomes.append(await rt.call(TENANT, "m", "put", f"k{index}", index, cls="Gate"))
        except OverloadedError as exc:
            outcomes.append(exc)

    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call(TENANT, "m", "put", "open", True, cls="Gate")  # activated: no thread hop
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: rt.call(TENANT, "m", "wait_and_put", "w", 0, cls="Gate"))
            await trio.testing.wait_all_tasks_blocked()
            for index in range(6):
                nursery.start_soon(put, index)
                await trio.testing.wait_all_tasks_blocked()
            shed = [o for o in outcomes if isinstance(o, OverloadedError)]
            assert len(shed) == 2
            assert rt.statistics().queued_envelopes == 4
            Gate.events["m"].set()
        assert rt.statistics().overloaded == 2
        for index in range(6):
            expected = index if index < 4 else None
            assert await rt.call(TENANT, "m", "get", f"k{index}") == expected


async def test_close_drains_queued_messages(data_dir: Path) -> None:
    results: list[Value] = []
    async with open_runtime(data_dir, classes=CLASSES) as rt:

        async def call(index: int) -> None:
            results.append(await rt.call(TENANT, f"c{index % 4}", "increment", cls="Counter"))

        for index in range(40):
            rt_nursery_call = call  # queued now, handled while the runtime closes
            trio.lowlevel.spawn_system_task(rt_nursery_call, index)
        await trio.testing.wait_all_tasks_blocked()
    assert len(results) == 40
    async with open_runtime(data_dir, classes=CLASSES) as rt:
        for agent in range(4):
            assert await rt.call(TENANT, f"c{agent}", "get") == 10
        await rt.aclose()
        with pytest.raises(UnavailableError):
            await rt.call(TENANT, "c0", "get")


async def test_close_past_grace_fails_queued_messages_as_retryable(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = RuntimeConfig(shutdown_grace_seconds=1, commit_threads=2)
    Gate.events["z"] = trio.Event()
    outcomes: list[object] = []

    async def call(method: str, *args: Value) -> None:
        try:
            outcomes.append(await rt.call(TENANT, "z", method, *args, cls="Gate"))
        except UnavailableError as exc:
            outcomes.append(exc)

    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call(TENANT, "z", "put", "open", True, cls="Gate")
        trio.lowlevel.spawn_system_task(call, "wait_and_put", "w", 1)
        await trio.testing.wait_all_tasks_blocked()
        for index in range(3):
            trio.lowlevel.spawn_system_task(call, "put", f"k{index}", index)
        await trio.testing.wait_all_tasks_blocked()
    assert len(outcomes) == 4
    assert all(isinstance(o, UnavailableError) and o.retryable for o in outcomes)
    async with open_runtime(data_dir, classes=CLASSES) as rt:
        assert await rt.call(TENANT, "z", "get", "w") is None
        assert await rt.call(TENANT, "z", "get", "k0") is None


async def test_open_facets_max_holds_for_activations_starting_together(data_dir: Path) -> None:
    config = RuntimeConfig(open_facets_max=8, commit_threads=4)
    peak = 0
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:

        async def call(index: int) -> None:
            nonlocal peak
            await rt.call(TENANT, f"a{index}", "increment", cls="Counter")
            peak = max(peak, rt.statistics().open_facets)

        async with trio.open_nursery() as nursery:
            for index in range(64):
                nursery.start_soon(call, index)
            while rt.statistics().calls < 64 or rt.statistics().queued_envelopes:
                peak = max(peak, rt.statistics().open_facets)
                await trio.sleep(0.001)
        for index in range(64):
            assert await rt.call(TENANT, f"a{index}", "get") == 1
    assert 0 < peak <= 8


async def test_failing_store_open_fails_that_facet_only(data_dir: Path) -> None:
    from facetrt import FacetAddress, InternalError

    async with open_runtime(data_dir, classes=CLASSES) as rt:
        await rt.call(TENANT, "healthy", "increment", cls="Counter")
        fanout = data_dir / FacetAddress(TENANT, "victim").relative_path().parent
        fanout.parent.mkdir(parents=True, exist_ok=True)
        fanout.write_text("not a directory")  # mkdir of the store will fail (ENOTDIR)
        with pytest.raises(InternalError, match="cannot open store"):
            await rt.call(TENANT, "victim", "increment", cls="Counter")
        assert await rt.call(TENANT, "healthy", "increment") == 2


class _ActivationStarts(trio.abc.Instrument):
    """Counts the activation tasks the router starts."""

    def __init__(self) -> None:
        self.starts = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Router._run"):
            self.starts += 1


async def test_a_runtime_cancelled_from_outside_answers_queued_messages_at_once(
    data_dir: Path,
) -> None:
    # Found by the seeded simulation (tests/sim): when the runtime's owner was cancelled
    # rather than closed, every activation started for the queued messages was cancelled
    # before it handled one, and the router started the next at once: a busy loop until the
    # grace period ended (thousands of activations a second), and for ever on an autojump
    # clock whose time only moves when no task can run. Real clock here: with writer threads
    # an autojump clock would leap to the end of the grace period and hide the loop.
    config = RuntimeConfig(shutdown_grace_seconds=2, commit_threads=2)
    Gate.events["q"] = trio.Event()
    outcomes: list[object] = []
    starts = _ActivationStarts()

    async def call(method: str, *args: Value) -> None:
        try:
            outcomes.append(await rt.call(TENANT, "q", method, *args, cls="Gate"))
        except UnavailableError as exc:
            outcomes.append(exc)

    with trio.CancelScope() as scope:
        async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
            await rt.call(TENANT, "q", "put", "created", True, cls="Gate")
            trio.lowlevel.add_instrument(starts)
            trio.lowlevel.spawn_system_task(call, "wait_and_put", "w", 1)
            await wait_until(lambda: rt.statistics().calls == 2)
            for index in range(3):
                trio.lowlevel.spawn_system_task(call, "put", f"k{index}", index)
            await wait_until(lambda: rt.statistics().queued_envelopes == 3)
            scope.cancel()
            await trio.sleep_forever()
    trio.lowlevel.remove_instrument(starts)
    assert starts.starts <= 1  # none after the cancellation
    assert len(outcomes) == 4
    assert all(isinstance(o, UnavailableError) and o.retryable for o in outcomes)
    async with open_runtime(data_dir, classes=CLASSES) as rt:
        assert await rt.call(TENANT, "q", "get", "w") is None
        assert await rt.call(TENANT, "q", "get", "k0") is None


async def test_an_activation_idle_with_a_commit_in_flight_is_not_timed_out(
    data_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A commit that takes real time on its writer thread: every task looks blocked meanwhile,
    # so the autojump clock jumps to the next deadline. The idle timeout must not be one of
    # them (it starts when the commit is done), or the facet would be timed out mid-commit:
    # virtual time would race ahead while the commit runs, and a commit finishing in the
    # same round as the timeout's wake-up was taken for idleness.
    def slow_commit(_: object) -> None:
        time.sleep(0.05)

    config = RuntimeConfig(idle_timeout_seconds=5, commit_threads=2)
    hooks = StoreHooks(before_commit=slow_commit)
    async with open_runtime(data_dir, classes=CLASSES, config=config, store_hooks=hooks) as rt:
        for index in range(20):
            assert await rt.call(TENANT, "c", "increment", cls="Counter") == index + 1
        assert (rt.statistics().activations, rt.statistics().passivations) == (1, 0)
        async with clock_held_during_store_jobs(rt):  # the close runs in real time
            await trio.sleep(5.5)  # idle (no commit) for longer than the timeout: passivated
            await wait_until(lambda: rt.statistics().passivations == 1, seconds=10)
