"""Timers (SPEC §3): named, durable, delivered at least once through the facet's mailbox.

Time is trio's autojump clock; the runtime's wall clock is derived from it
(``tests.util.trio_wall_clock``), so due times and sleeps move together and nothing waits in
real time. Deliveries are observed through ``Alarm.deliveries`` (in-process, waited for without
polling) and through the ``fired/<name>`` counters ``on_timer`` commits.

The autojump clock would also jump while a writer thread commits (trio sees every task
blocked); ``clock_held_during_store_jobs`` keeps a task runnable meanwhile, so virtual time
only passes when the runtime is idle, and the times asserted here are exact.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
from typing import TYPE_CHECKING, ClassVar

import pytest
import trio
import trio.testing

from facetrt import (
    BadRequestError,
    Facet,
    FacetAddress,
    FacetrtError,
    HandlerError,
    InternalError,
    QuotaExceededError,
    RuntimeConfig,
    StorageError,
    open_runtime,
    rpc,
)
from facetrt.runtime._runtime import open_runtime_using
from facetrt.storage import TimerIndex
from facetrt.testing import StoreHooks
from tests.facets import CLASSES, Alarm
from tests.sim.workers import LoopStoreWorkers
from tests.util import WALL_CLOCK_BASE, clock_held_during_store_jobs, trio_wall_clock, wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from facetrt import Runtime, Value

TENANT = "acme"
Clock = trio.testing.MockClock


@pytest.fixture(autouse=True)
def _clear_deliveries() -> None:
    Alarm.deliveries.clear()


@contextlib.asynccontextmanager
async def _open(data_dir: Path, **overrides: object) -> AsyncIterator[Runtime]:
    """A runtime on the test's wall clock; virtual time stands still while threads commit."""
    config = RuntimeConfig.model_validate({"commit_threads": 2, **overrides})
    async with (
        open_runtime(data_dir, classes=CLASSES, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        yield rt


@pytest.fixture
async def rt(data_dir: Path) -> AsyncIterator[Runtime]:
    async with _open(data_dir) as runtime:
        yield runtime


def _index(data_dir: Path) -> TimerIndex:
    return TimerIndex(data_dir / "timers", map_size_bytes=1 << 20, readers_max=4)


def names_of(timers: Value) -> list[str]:
    assert isinstance(timers, list)
    names = []
    for timer in timers:
        assert isinstance(timer, dict)
        name = timer["name"]
        assert isinstance(name, str)
        names.append(name)
    return names


def delivered(agent: str | None = None) -> list[str]:
    return [name for who, name, *_ in Alarm.deliveries if agent is None or who == agent]


async def test_many_timers_of_one_facet_fire_in_due_order(
    autojump_clock: Clock, rt: Runtime
) -> None:
    delays: dict[str, Value] = {"e": 50.0, "b": 20.0, "a": 20.0, "d": 40.0, "c": 30.0, "f": 0.0}
    started = trio.current_time()
    await rt.call(TENANT, "x", "set_many", delays, cls="Alarm")
    await Alarm.wait_deliveries(len(delays))
    assert delivered() == ["f", "a", "b", "c", "d", "e"]  # equal due times fire by name
    for _, name, payload, attempt, delivered_at in Alarm.deliveries:
        assert payload == name
        assert attempt == 1
        delay = delays[name]
        assert isinstance(delay, float)
        assert delivered_at - started >= delay  # never early
    assert await rt.call(TENANT, "x", "list_timers") == []
    assert await rt.call(TENANT, "x", "fired") == dict.fromkeys(delays, 1)
    assert rt.statistics().timers_fired == len(delays)


async def test_set_replaces_by_name_and_cancel_removes(autojump_clock: Clock, rt: Runtime) -> None:
    now = trio_wall_clock()
    results = await rt.call(
        TENANT,
        "x",
        "script",
        [
            ["set", "a", 1000, 1],
            ["set", "a", 2000, 2],
            ["set", "b", 500, None],
            ["list"],
            ["cancel", "b"],
            ["cancel", "b"],
            ["get", "b"],
            ["get", "a"],
        ],
        cls="Alarm",
    )
    assert isinstance(results, list)
    listed, cancelled, cancelled_again, b, a = results[3:]
    assert names_of(listed) == ["b", "a"]
    assert (cancelled, cancelled_again, b) == (True, False, None)
    assert a == {
        "name": "a",
        "at": pytest.approx(now + 2000, abs=0.002),
        "payload": 2,
        "attempts": 0,
        "failed": False,
        "error": None,
    }
    # A later message sees the committed state.
    assert await rt.call(TENANT, "x", "list_timers") == [a]
    await Alarm.wait_deliveries(1)
    await trio.sleep(5000)  # anything else due would have fired by now
    assert [(name, payload) for _, name, payload, *_ in Alarm.deliveries] == [("a", 2)]


async def test_a_message_that_raises_sets_no_timer(autojump_clock: Clock, rt: Runtime) -> None:
    with pytest.raises(HandlerError):
        await rt.call(TENANT, "x", "set_then_fail", "t", 1.0, cls="Alarm")
    assert await rt.call(TENANT, "x", "get", "t") is None
    await rt.call(TENANT, "x", "set_in_rolled_back_transaction", "kept", "dropped")
    assert names_of(await rt.call(TENANT, "x", "list_timers")) == ["kept"]
    await Alarm.wait_deliveries(1)
    await trio.sleep(100)
    assert delivered() == ["kept"]


async def test_failing_timer_is_retried_with_backoff_then_recorded_as_failed(
    autojump_clock: Clock, rt: Runtime
) -> None:
    """Goal: 1 delivery + 6 retries at +2, +4, ... +64 s, then failed and shown by inspect.

    Method: ``on_timer`` fails every attempt; the (virtual) gaps between attempts are at least
    the backoff and less than a second more (a commit's thread time may add a jump).
    """
    await rt.call(TENANT, "x", "set", "doomed", payload={"fail_until": 100}, cls="Alarm")
    await rt.call(TENANT, "x", "set", "healthy", after_seconds=100_000)
    await Alarm.wait_deliveries(7)
    await trio.sleep(1000)
    assert [attempt for *_, attempt, _ in Alarm.deliveries] == [1, 2, 3, 4, 5, 6, 7]
    times = [at for *_, at in Alarm.deliveries]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for gap, backoff in zip(gaps, [2, 4, 8, 16, 32, 64], strict=True):
        assert backoff <= gap < backoff + 1
    # A failed delivery wrote nothing: the counter of on_timer never committed.
    assert await rt.call(TENANT, "x", "fired") == {}
    timer = await rt.call(TENANT, "x", "get", "doomed")
    assert isinstance(timer, dict)
    assert (timer["failed"], timer["attempts"]) == (True, 7)
    assert timer["error"] == "RuntimeError: failing attempt 7 on purpose"
    report = await rt.inspect(TENANT, "x")
    assert report["timers"] == 2
    assert report["timers_failed"] == 1
    assert report["timers_failed_names"] == ["doomed"]
    healthy = await rt.call(TENANT, "x", "get", "healthy")
    assert isinstance(healthy, dict)
    assert report["timer_next_due"] == healthy["at"]
    statistics = rt.statistics()
    assert (statistics.timer_handler_failures, statistics.timers_failed) == (7, 1)
    # Setting a failed timer again replaces it with a fresh one.
    await rt.call(TENANT, "x", "set", "doomed", payload={"fail_until": 0})
    await Alarm.wait_deliveries(8)
    assert await rt.call(TENANT, "x", "fired") == {"doomed": 1}
    assert (await rt.inspect(TENANT, "x"))["timers_failed"] == 0


async def test_timer_that_recovers_on_a_retry_commits_its_writes_once(
    autojump_clock: Clock, rt: Runtime
) -> None:
    await rt.call(TENANT, "x", "set", "flaky", payload={"fail_until": 2}, cls="Alarm")
    await Alarm.wait_deliveries(3)
    await trio.sleep(100)
    assert [attempt for *_, attempt, _ in Alarm.deliveries] == [1, 2, 3]
    assert await rt.call(TENANT, "x", "fired") == {"flaky": 1}
    assert await rt.call(TENANT, "x", "get", "flaky") is None


async def test_passivated_facet_is_woken_by_its_timer(
    autojump_clock: Clock, data_dir: Path
) -> None:
    async with _open(data_dir, idle_timeout_seconds=5) as rt:
        await rt.call(TENANT, "sleepy", "set", "wake", after_seconds=1000, cls="Alarm")
        await wait_until(lambda: rt.statistics().passivations == 1, seconds=100)
        assert rt.statistics().open_facets == 0
        assert Alarm.deliveries == []
        await Alarm.wait_deliveries(1)
        assert rt.statistics().activations == 2
        assert await rt.call(TENANT, "sleepy", "fired") == {"wake": 1}


async def test_timers_survive_a_restart(autojump_clock: Clock, data_dir: Path) -> None:
    async with _open(data_dir) as rt:
        await rt.call(TENANT, "x", "set_many", {"soon": 1000.0, "later": 9000.0}, cls="Alarm")
        await rt.call(TENANT, "y", "set_many", {"overdue": 1000.0}, cls="Alarm")
    assert Alarm.deliveries == []
    await trio.sleep(5000)  # "overdue" and "soon" become due while no runtime runs
    async with _open(data_dir) as rt:
        await Alarm.wait_deliveries(2)
        assert sorted(delivered()) == ["overdue", "soon"]
        assert rt.statistics().activations == 2  # woken by their timers, nothing else
        await Alarm.wait_deliveries(3)
        assert delivered()[-1] == "later"


async def test_due_timers_of_many_facets_are_delivered_one_wake_per_facet(
    autojump_clock: Clock, rt: Runtime
) -> None:
    agents = [f"a{index}" for index in range(40)]
    for agent in agents:
        await rt.call(
            TENANT, agent, "set_many", {"x": 1000.0, "y": 1000.0, "z": 1000.0}, cls="Alarm"
        )
    await Alarm.wait_deliveries(3 * len(agents))
    for agent in agents:
        assert delivered(agent) == ["x", "y", "z"]
    assert rt.statistics().timer_wakes == len(agents)


class NoTimers(Facet):
    @rpc
    async def set(self) -> None:
        self.timers.set("t", after_seconds=1)


async def test_class_without_on_timer_cannot_set_timers(
    autojump_clock: Clock, data_dir: Path
) -> None:
    async with open_runtime(data_dir, classes={"N": NoTimers}, wall_clock=trio_wall_clock) as rt:
        with pytest.raises(HandlerError) as info:
            await rt.call(TENANT, "n", "set", cls="N")
        assert info.value.type_name == "TypeError"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"at": 1.0, "after_seconds": 1.0},
        {"after_seconds": -1.0},
        {"at": float("nan")},
        {"at": True},
        {"payload": "x" * 70_000},
    ],
)
async def test_bad_timer_arguments_are_refused(
    autojump_clock: Clock, rt: Runtime, kwargs: dict[str, Value]
) -> None:
    with pytest.raises(BadRequestError):
        await rt.call(
            TENANT,
            "x",
            "set",
            "t",
            kwargs.get("at"),
            kwargs.get("after_seconds"),
            kwargs.get("payload"),
            cls="Alarm",
        )
    with pytest.raises(BadRequestError):
        await rt.call(TENANT, "x", "set", "n" * 300, cls="Alarm")
    assert await rt.call(TENANT, "x", "list_timers") == []


async def test_timers_per_facet_are_bounded(autojump_clock: Clock, data_dir: Path) -> None:
    async with _open(data_dir, timers_per_facet_max=3) as rt:
        delays: dict[str, Value] = {"a": 5000.0, "b": 5000.0, "c": 5000.0}
        await rt.call(TENANT, "x", "set_many", delays, cls="Alarm")
        with pytest.raises(QuotaExceededError):
            await rt.call(TENANT, "x", "set", "d", after_seconds=5000)
        await rt.call(TENANT, "x", "set", "a", after_seconds=6000)  # replacing needs no room
        results = await rt.call(
            TENANT, "x", "script", [["cancel", "b"], ["set", "d", 5000, None], ["list"]]
        )
        assert isinstance(results, list)
        assert len(names_of(results[2])) == 3
        assert (await rt.inspect(TENANT, "x"))["timers"] == 3


async def test_hint_of_a_deleted_facet_is_removed(autojump_clock: Clock, data_dir: Path) -> None:
    async with _open(data_dir) as rt:
        await rt.call(TENANT, "gone", "set", "t", after_seconds=1000, cls="Alarm")
    shutil.rmtree(data_dir / "tenants")  # what deleting the facet's files leaves behind
    await trio.sleep(2000)
    async with _open(data_dir) as rt:
        await wait_until(lambda: rt.statistics().timer_hints_removed == 1, seconds=100)
        assert rt.statistics().activations == 0
    index = _index(data_dir)
    try:
        assert index.count() == 0
    finally:
        index.close()


async def test_spurious_hint_wakes_the_facet_once_and_is_settled(
    autojump_clock: Clock, data_dir: Path
) -> None:
    """A hint with nothing due (as a crash after the index write leaves) is harmless."""
    async with _open(data_dir) as rt:
        await rt.call(TENANT, "x", "set", "t", after_seconds=5000, cls="Alarm")
    index = _index(data_dir)
    try:
        index.lower(FacetAddress(TENANT, "x"), int(trio_wall_clock() * 1000) + 1000)
    finally:
        index.close()
    async with _open(data_dir) as rt:
        await wait_until(lambda: rt.statistics().timer_wakes == 1, seconds=100)
        await trio.sleep(1000)
        assert rt.statistics().timer_wakes == 1
        assert Alarm.deliveries == []
        await Alarm.wait_deliveries(1)
        assert rt.statistics().timer_wakes == 2
    assert WALL_CLOCK_BASE > 0


async def test_store_without_a_hint_registers_its_timers_when_it_activates(
    autojump_clock: Clock, data_dir: Path
) -> None:
    """A store restored, cloned or imported comes without a hint; its next activation adds it."""
    async with _open(data_dir) as rt:
        await rt.call(TENANT, "x", "set", "t", after_seconds=1000, cls="Alarm")
    shutil.rmtree(data_dir / "timers")
    async with _open(data_dir) as rt:
        assert await rt.call(TENANT, "x", "fired") == {}  # activates it: the hint comes back
        await Alarm.wait_deliveries(1)
        assert await rt.call(TENANT, "x", "fired") == {"t": 1}


class _BrokenOnActivate(Alarm):
    """An Alarm whose ``on_activate`` raises while ``broken`` is set: its wakes all fail."""

    broken: ClassVar[bool] = False

    async def on_activate(self) -> None:
        if _BrokenOnActivate.broken:
            raise RuntimeError("on_activate fails on purpose")


async def test_facets_whose_wakes_fail_do_not_starve_other_tenants_timers(
    autojump_clock: Clock, data_dir: Path
) -> None:
    """Goal: one tenant's facets that cannot be woken (their ``on_activate`` raises, or their
    class is gone) must not keep another tenant's timers from firing.

    Method: two wake slots; tenant ``bad`` has two facets due first whose wakes fail (so their
    hints stay the earliest and they are deferred, then woken again); tenant ``good`` has one
    timer due after them. It must fire, on the first refill after the deferrals end.
    """
    config = RuntimeConfig(commit_threads=2, timer_wakes_in_flight_max=2, idle_timeout_seconds=1)
    classes = {**CLASSES, "Broken": _BrokenOnActivate}
    async with (
        open_runtime(data_dir, classes=classes, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        for agent in ("b0", "b1"):
            await rt.call("bad", agent, "set", "t", after_seconds=5, cls="Broken")
        _BrokenOnActivate.broken = True
        try:
            await rt.call("good", "g", "set", "t", after_seconds=10, cls="Alarm")
            with trio.move_on_after(600):
                await Alarm.wait_deliveries(1)
        finally:
            _BrokenOnActivate.broken = False
        assert delivered() == ["t"]
        assert [who for who, *_ in Alarm.deliveries] == ["g"]


class _SlowOnceAlarm(Alarm):
    """An Alarm whose first delivery sleeps for a long time before it does anything; ``nap``
    is a call that takes its time."""

    slept: ClassVar[list[str]] = []

    async def on_timer(self, name: str, payload: Value, attempt: int) -> None:
        if not _SlowOnceAlarm.slept:
            _SlowOnceAlarm.slept.append(name)
            await trio.sleep(10_000)
        await super().on_timer(name, payload, attempt)

    @rpc
    async def nap(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self.storage.put("napped", seconds)


def _hint(data_dir: Path, agent: str) -> int | None:
    index = _index(data_dir)
    try:
        return index.hint_of(FacetAddress(TENANT, agent))
    finally:
        index.close()


async def test_timers_of_a_wake_cut_short_by_shutdown_still_fire_after_restart(
    autojump_clock: Clock, data_dir: Path
) -> None:
    """Goal: a wake whose ``on_timer`` is cancelled when the runtime closes (its grace period
    ended while the handler ran) loses none of its timers: after a restart they fire without
    any call to the facet.

    Before the fix the wake had taken its due timers out of the activation's schedule; the
    commit that closes the activation then settled the facet's hint in the timer index to
    "nothing scheduled" while its store still held both timers, so neither fired until
    something else activated the facet (found by the seeded simulation).
    """
    _SlowOnceAlarm.slept.clear()
    classes = {**CLASSES, "SlowOnce": _SlowOnceAlarm}
    config = RuntimeConfig(commit_threads=2, shutdown_grace_seconds=1)
    due = trio_wall_clock() + 5
    async with (
        open_runtime(data_dir, classes=classes, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        await rt.call(TENANT, "x", "set_many", {"a": 5.0, "b": 5.0}, cls="SlowOnce")
        await trio.sleep(10)  # the wake runs: on_timer("a") sleeps, "b" waits its turn
        assert _SlowOnceAlarm.slept == ["a"]
    assert Alarm.deliveries == []  # cancelled at the end of the grace period
    hint = _hint(data_dir, "x")
    assert hint is not None
    assert hint <= math.ceil(due * 1000)
    async with (
        open_runtime(data_dir, classes=classes, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        await Alarm.wait_deliveries(2, seconds=100)
        assert delivered() == ["a", "b"]
        assert rt.statistics().activations == 1  # woken by its timers, by nothing else
        assert await rt.call(TENANT, "x", "list_timers") == []


async def test_a_commit_made_while_on_timer_runs_keeps_the_hint_at_or_before_its_timer(
    autojump_clock: Clock, data_dir: Path
) -> None:
    """Goal: decision 0007's invariant holds at every instant, also while a timer is being
    delivered: the timer stays in the facet's store until its delivery commits, so every
    commit before that keeps the facet's hint at or before it (a crash then must not lose it).

    Method: a call that takes 10 s is running when timer "a" comes due; the wake queues behind
    it, and when ``on_timer("a")`` suspends, the call's writes commit (decision 0018) while the
    delivery sleeps. The index on disk must still hold a hint at or before "a", not the next
    timer's. Before the fix the wake had taken "a" out of the activation's schedule, and that
    commit settled the hint to timer "z", 500 s later (found by the seeded simulation).
    """
    _SlowOnceAlarm.slept.clear()
    classes = {**CLASSES, "SlowOnce": _SlowOnceAlarm}
    config = RuntimeConfig(commit_threads=2, shutdown_grace_seconds=1)
    due = trio_wall_clock() + 5
    async with (
        open_runtime(data_dir, classes=classes, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        await rt.call(TENANT, "x", "set_many", {"a": 5.0, "z": 500.0}, cls="SlowOnce")
        await rt.call(TENANT, "x", "nap", 10.0)  # acknowledged: committed while "a" runs
        assert _SlowOnceAlarm.slept == ["a"]
        hint = rt.core.timer_index.hint_of(FacetAddress(TENANT, "x"))
        assert hint is not None
        assert hint <= math.ceil(due * 1000)
    assert _hint(data_dir, "x") == math.ceil(due * 1000)  # the delivery was cut short
    async with (
        open_runtime(data_dir, classes=classes, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        await Alarm.wait_deliveries(1, seconds=100)
        assert delivered() == ["a"]


class _SlowFailure:
    """Store faults for ``LoopStoreWorkers`` and ``StoreHooks``: once armed, the next store job
    waits ``seconds`` of trio time first, and the next facet commit fails."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.delay_armed = False
        self.failure_armed = False

    def arm(self) -> None:
        self.delay_armed = self.failure_armed = True

    def delay(self) -> float:
        armed, self.delay_armed = self.delay_armed, False
        return self.seconds if armed else 0.0

    def before_commit(self, path: Path) -> None:
        if self.failure_armed:
            self.failure_armed = False
            raise StorageError("injected commit failure")


class _CallingAlarm(Alarm):
    """An Alarm whose first delivery calls another facet first: the output gate makes it
    wait for the commit in flight."""

    calling: ClassVar[bool] = False

    async def on_timer(self, name: str, payload: Value, attempt: int) -> None:
        if not _CallingAlarm.calling:
            _CallingAlarm.calling = True
            await self.facets.call("other", "fired", cls="Alarm")
        await super().on_timer(name, payload, attempt)


async def test_a_commit_failing_while_a_wake_waits_on_it_resets_the_facet_not_the_node(
    autojump_clock: Clock, data_dir: Path
) -> None:
    """Goal: a failed commit resets its facet only (decision 0012), also when a wake was
    running timers that the failed commit had set.

    Method: store jobs run on the loop (``LoopStoreWorkers``), so the order is exact. The
    commit of ``set("b")``, b due with "a", waits 10 s; the wake for "a" and "b" comes at 5 s.
    ``on_timer("a")`` calls another facet, which waits for that commit (the output gate); the
    commit then fails. The failure wakes the waiting delivery before its cancellation can reach
    it, so the wake goes on to "b" until its next checkpoint. Before the fix the activation's
    timer state still listed "b" (it described the failed commit), the store had no "b", and
    the activation's assertion that they agree stopped the whole runtime (found by the seeded
    simulation, seed 295 of its final plan).
    """
    _CallingAlarm.calling = False
    faults = _SlowFailure(10.0)
    classes = {**CLASSES, "Calling": _CallingAlarm}
    outcomes: dict[str, object] = {}
    async with trio.open_nursery() as outer:
        workers = LoopStoreWorkers(outer, runners=1, delay=faults.delay)
        async with open_runtime_using(
            workers,
            data_dir,
            classes=classes,
            config=RuntimeConfig(),
            store_hooks=StoreHooks(before_commit=faults.before_commit),
            wall_clock=trio_wall_clock,
        ) as rt:
            await rt.call(TENANT, "x", "set", "a", after_seconds=5, cls="Calling")
            a = await rt.call(TENANT, "x", "get", "a")
            assert isinstance(a, dict)
            a_at = a["at"]
            assert isinstance(a_at, float)
            faults.arm()
            try:
                await rt.call(TENANT, "x", "set", "b", at=a_at - 0.0005)  # due with "a"
            except FacetrtError as exc:
                outcomes["b"] = exc
            assert isinstance(outcomes["b"], InternalError)
            assert _CallingAlarm.calling  # the wake ran while the commit of "b" waited
            # The node goes on: the next wake delivers "a"; "b" was never set.
            await Alarm.wait_deliveries(1)
            assert delivered() == ["a"]
            assert await rt.call(TENANT, "x", "list_timers") == []
            assert rt.statistics().commit_failures == 1
