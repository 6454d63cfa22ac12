"""Turn semantics and group commit (SPEC §3): one message at a time, atomic writes, output gate.

Commits are held or failed with the storage layer's ``StoreHooks`` (a real delay or fault in
the writer thread, not a mock), so the tests can observe what happens while a commit is in
flight.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import TYPE_CHECKING

import outcome
import pytest
import trio

from facetrt import (
    FacetAddress,
    HandlerError,
    InternalError,
    Runtime,
    RuntimeConfig,
    open_runtime,
)
from facetrt.testing import StoreHooks
from tests.facets import CLASSES, Gate, SlowStart
from tests.util import clock_held_during_store_jobs, wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from facetrt import Value

TENANT = "acme"


class CommitValve:
    """A before-commit hook that holds (or fails) commits of one facet, on demand."""

    def __init__(self, data_dir: Path, agent_id: str) -> None:
        self.path = (data_dir / FacetAddress(TENANT, agent_id).relative_path()).resolve()
        self.closed = False
        self.fail_next = False
        self.entered = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self.commits = 0

    def hold(self) -> None:
        self.entered.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __call__(self, path: Path) -> None:
        if path != self.path:
            return
        self.commits += 1
        self.entered.set()
        self._open.wait(timeout=30)
        if self.fail_next:
            self.fail_next = False
            raise OSError("injected commit failure")

    async def wait_entered(self) -> None:
        await trio.to_thread.run_sync(self.entered.wait, 30)


@pytest.fixture
def valve(data_dir: Path) -> CommitValve:
    return CommitValve(data_dir, "a")


@pytest.fixture
async def vrt(data_dir: Path, config: RuntimeConfig, valve: CommitValve) -> AsyncIterator[Runtime]:
    hooks = StoreHooks(before_commit=valve)
    async with open_runtime(data_dir, classes=CLASSES, config=config, store_hooks=hooks) as rt:
        yield rt


async def _call_into(
    rt: Runtime, results: dict[str, object], name: str, agent: str, method: str, *args: Value
) -> None:
    try:
        results[name] = await rt.call(TENANT, agent, method, *args, cls="Register")
    except Exception as exc:  # noqa: BLE001 - the test inspects the outcome
        results[name] = exc


async def test_reply_is_not_released_before_its_commit_returns(
    vrt: Runtime, valve: CommitValve
) -> None:
    results: dict[str, object] = {}
    valve.hold()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_call_into, vrt, results, "put", "a", "put", "k", 1)
        await valve.wait_entered()
        # The commit is inside the writer thread, before LMDB's commit: no reply yet.
        await trio.sleep(0.05)
        assert results == {}
        valve.release()
    assert results == {"put": None}
    assert await vrt.call(TENANT, "a", "get", "k") == 1


async def test_failing_handler_in_a_batch_loses_only_its_own_writes(
    vrt: Runtime, valve: CommitValve
) -> None:
    """Goal: group commit keeps each message all-or-nothing. Method: hold the first commit so
    the next three messages accumulate into one batch, the middle one raising."""
    await vrt.call(TENANT, "a", "put", "first", 0, cls="Register")
    results: dict[str, object] = {}
    valve.hold()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_call_into, vrt, results, "m0", "a", "put", "m0", 0)
        await valve.wait_entered()
        before = vrt.statistics()
        nursery.start_soon(_call_into, vrt, results, "m1", "a", "put", "x", 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_call_into, vrt, results, "m2", "a", "put_then_fail", "y", 2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_call_into, vrt, results, "m3", "a", "put", "z", 3)
        await trio.testing.wait_all_tasks_blocked()
        assert results == {}
        valve.release()
    after = vrt.statistics()
    assert results["m1"] is None
    assert results["m3"] is None
    assert isinstance(results["m2"], HandlerError)
    assert results["m2"].type_name == "ValueError"
    # m0 alone, then m1..m3 in one commit.
    assert after.commits - before.commits == 2
    assert after.committed_envelopes - before.committed_envelopes == 4
    dump = await vrt.call(TENANT, "a", "dump")
    assert dump == {"first": 0, "m0": 0, "x": 1, "z": 3}


async def test_failed_commit_answers_internal_and_resets_the_facet(
    vrt: Runtime, valve: CommitValve
) -> None:
    await vrt.call(TENANT, "a", "put", "kept", 1, cls="Register")
    results: dict[str, object] = {}
    valve.hold()
    valve.fail_next = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_call_into, vrt, results, "m0", "a", "put", "lost0", 0)
        await valve.wait_entered()
        # Accumulates behind the failing commit and read its writes' layer: must fail too.
        nursery.start_soon(_call_into, vrt, results, "m1", "a", "put", "lost1", 1)
        await trio.testing.wait_all_tasks_blocked()
        valve.release()
    assert isinstance(results["m0"], InternalError)
    assert isinstance(results["m1"], InternalError)
    assert results["m0"].retryable
    stats = vrt.statistics()
    assert stats.commit_failures == 1
    assert stats.resets == 1
    # The next call re-activates from disk: only acknowledged writes are there.
    assert await vrt.call(TENANT, "a", "dump") == {"kept": 1}
    await vrt.call(TENANT, "a", "put", "after", 2)
    assert await vrt.call(TENANT, "a", "dump") == {"after": 2, "kept": 1}


async def test_blocked_handler_keeps_its_facet_closed_while_others_proceed(rt: Runtime) -> None:
    Gate.events["g1"] = trio.Event()
    done: list[str] = []

    async def call(name: str, agent: str, method: str, *args: Value) -> None:
        await rt.call(TENANT, agent, method, *args, cls="Gate")
        done.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "blocker", "g1", "wait_and_put", "k", "blocked")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "second", "g1", "put", "k", "second")
        await call("other", "g2", "put", "k", "other")
        await trio.sleep(0.05)
        assert done == ["other"]
        Gate.events["g1"].set()
    # Both finish in one wake and commit together: their callers resume in either order.
    assert done[0] == "other"
    assert sorted(done[1:]) == ["blocker", "second"]
    assert await rt.call(TENANT, "g1", "get", "k") == "second"  # second ran after blocker


async def test_one_wake_commits_every_message_it_finished_at_once(rt: Runtime) -> None:
    """Messages queued behind a blocked handler are handled in one wake after it and commit
    together: one fsync, not one for the first message and one for the rest (decision 0018)."""
    Gate.events["w"] = trio.Event()
    await rt.call(TENANT, "w", "put", "k", 0, cls="Gate")
    before = rt.statistics()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: rt.call(TENANT, "w", "wait_and_put", "blocker", 1))
        await trio.testing.wait_all_tasks_blocked()
        for index in range(10):
            nursery.start_soon(partial(rt.call, TENANT, "w", "put", "k", index))
        await trio.testing.wait_all_tasks_blocked()
        assert rt.statistics().commits == before.commits
        Gate.events["w"].set()
    after = rt.statistics()
    assert after.commits - before.commits == 1
    assert after.committed_envelopes - before.committed_envelopes == 11


def _submit(
    rt: Runtime,
    agent: str,
    method: str,
    args: tuple[Value, ...],
    into: dict[str, object],
    name: str,
) -> None:
    """Queue a call without a checkpoint (so that several land in one wake, in order)."""

    def answered(result: outcome.Outcome[Value]) -> None:
        into[name] = result

    core = rt.core
    core.submit(
        core.address_of(TENANT, agent),
        method,
        args,
        {},
        cls="Gate",
        idempotency_key=None,
        chain=(),
        callback=answered,
    )


async def test_a_suspending_handler_first_lets_earlier_messages_of_its_wake_commit(
    rt: Runtime,
) -> None:
    """In one wake: a put, then a handler that blocks. The put is not the wake's last
    message, but its reply must not wait for the blocked one: the commit starts when the
    handler suspends (decision 0018)."""
    Gate.events["s"] = trio.Event()
    await rt.call(TENANT, "s", "put", "k0", 0, cls="Gate")
    replies: dict[str, object] = {}
    _submit(rt, "s", "put", ("k1", 1), replies, "k1")
    _submit(rt, "s", "wait_and_put", ("slow", 1), replies, "slow")
    async with clock_held_during_store_jobs(rt):
        await wait_until(lambda: "k1" in replies)
    assert replies == {"k1": outcome.Value(None)}
    Gate.events["s"].set()
    async with clock_held_during_store_jobs(rt):
        await wait_until(lambda: "slow" in replies)
    assert replies["slow"] == outcome.Value(None)
    assert await rt.call(TENANT, "s", "get", "slow") == 1


async def test_a_handler_failing_after_it_suspended_is_a_handler_error(rt: Runtime) -> None:
    """The hand-driven handler (a put before it in the same wake) still fails cleanly: its
    writes are dropped, the earlier message's are kept."""
    Gate.events["f"] = trio.Event()
    await rt.call(TENANT, "f", "put", "k0", 0, cls="Gate")
    replies: dict[str, object] = {}
    _submit(rt, "f", "put", ("k1", 1), replies, "k1")
    _submit(rt, "f", "wait_and_fail", ("doomed",), replies, "doomed")
    async with clock_held_during_store_jobs(rt):
        await wait_until(lambda: "k1" in replies)
    Gate.events["f"].set()
    async with clock_held_during_store_jobs(rt):
        await wait_until(lambda: "doomed" in replies)
    failed = replies["doomed"]
    assert isinstance(failed, outcome.Error)
    assert isinstance(failed.error, HandlerError)
    assert "failed after waiting" in failed.error.message
    assert await rt.call(TENANT, "f", "get", "k1") == 1
    assert await rt.call(TENANT, "f", "get", "doomed") is None


async def test_cancelling_a_hand_driven_handler_fails_only_that_message(rt: Runtime) -> None:
    """A deadline that passes while the hand-driven handler waits: Cancelled goes through
    ``_resume`` into the handler; the earlier message stays committed."""
    Gate.events["c"] = trio.Event()
    await rt.call(TENANT, "c", "put", "k0", 0, cls="Gate")
    replies: dict[str, object] = {}
    _submit(rt, "c", "put", ("k1", 1), replies, "k1")
    _submit(rt, "c", "wait_and_put", ("cut", 1), replies, "cut")
    async with clock_held_during_store_jobs(rt):
        await wait_until(lambda: "k1" in replies)
    router = rt.core.router
    assert router is not None
    activation = router.running_activation(rt.core.address_of(TENANT, "c"))
    assert activation is not None
    activation.cancel()  # what a reset or a shutdown past its grace does to a running handler
    async with clock_held_during_store_jobs(rt):
        await wait_until(lambda: "cut" in replies)
    assert isinstance(replies["cut"], outcome.Error)
    assert await rt.call(TENANT, "c", "get", "k1") == 1
    assert await rt.call(TENANT, "c", "get", "cut") is None


async def test_an_abandoned_last_message_does_not_strand_the_replies_before_it(
    rt: Runtime,
) -> None:
    """The wake's last envelope is skipped (its caller gave up before it started): the
    messages finished before it still commit at once, not when the next message arrives or
    the facet passivates (found in review of decision 0018)."""
    Gate.events["ab"] = trio.Event()
    await rt.call(TENANT, "ab", "put", "k0", 0, cls="Gate")
    replies: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(rt.call, TENANT, "ab", "wait_and_put", "blocker", 1))
        await trio.testing.wait_all_tasks_blocked()
        _submit(rt, "ab", "put", ("k1", 1), replies, "k1")
        gave_up = trio.CancelScope()

        async def abandoned() -> None:
            with gave_up:
                await rt.call(TENANT, "ab", "put", "k2", 2)

        nursery.start_soon(abandoned)
        await trio.testing.wait_all_tasks_blocked()
        gave_up.cancel()
        await trio.testing.wait_all_tasks_blocked()
        Gate.events["ab"].set()
        async with clock_held_during_store_jobs(rt):
            await wait_until(lambda: "k1" in replies, seconds=3)
    assert replies["k1"] == outcome.Value(None)
    assert await rt.call(TENANT, "ab", "get", "k2") is None  # skipped: applied nothing


async def test_a_slow_on_activate_does_not_hold_back_earlier_replies_of_its_wake(
    data_dir: Path, config: RuntimeConfig
) -> None:
    """An operator's inspect finishes before the next message activates the facet; a slow
    ``on_activate`` (a hook, stepped like a handler) must not hold its reply back."""
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call(TENANT, "slow", "put", "k", 0, cls="SlowStart")
        core = rt.core
        address = core.address_of(TENANT, "slow")
        router = core.router
        assert router is not None
        async with router.hold(address):  # passivate it: the next message activates it again
            pass
        SlowStart.gate = trio.Event()
        try:
            replies: dict[str, object] = {}
            core.submit(
                address,
                "inspect",
                (),
                {},
                cls=None,
                idempotency_key=None,
                chain=(),
                internal=True,
                callback=partial(replies.__setitem__, "inspect"),
            )
            core.submit(
                address,
                "put",
                ("k", 1),
                {},
                cls="SlowStart",
                idempotency_key=None,
                chain=(),
                callback=partial(replies.__setitem__, "put"),
            )
            async with clock_held_during_store_jobs(rt):
                await wait_until(lambda: "inspect" in replies, seconds=3)
            assert "put" not in replies  # still in on_activate
            SlowStart.gate.set()
            async with clock_held_during_store_jobs(rt):
                await wait_until(lambda: "put" in replies, seconds=3)
        finally:
            SlowStart.gate = None
    assert replies["put"] == outcome.Value(None)


async def test_slow_handler_does_not_hold_back_earlier_replies(
    vrt: Runtime, valve: CommitValve
) -> None:
    Gate.events["a"] = trio.Event()
    results: dict[str, object] = {}

    async def gate_call() -> None:
        results["slow"] = await vrt.call(TENANT, "a", "wait_and_put", "slow", 1, cls="Gate")

    await vrt.call(TENANT, "a", "put", "k0", 0, cls="Gate")
    valve.hold()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_gate_put, vrt, results, "k1")
        await valve.wait_entered()
        nursery.start_soon(_gate_put, vrt, results, "k2")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(gate_call)
        await trio.testing.wait_all_tasks_blocked()
        valve.release()
        # k1 and k2 commit and answer while the slow handler is still blocked.
        with trio.fail_after(10):
            while "k2" not in results:
                await trio.sleep(0.01)
        assert "slow" not in results
        Gate.events["a"].set()
    assert results == {"k1": None, "k2": None, "slow": None}


async def _gate_put(rt: Runtime, results: dict[str, object], key: str) -> None:
    results[key] = await rt.call(TENANT, "a", "put", key, 1, cls="Gate")


async def test_call_leaving_a_facet_waits_for_its_pending_writes(
    vrt: Runtime, valve: CommitValve, data_dir: Path
) -> None:
    """Output gate: a message to another facet leaves only after earlier writes are durable."""
    await vrt.call(TENANT, "a", "put", "k0", 0, cls="Register")
    target_dir = data_dir / FacetAddress(TENANT, "b").relative_path()
    results: dict[str, object] = {}
    valve.hold()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_call_into, vrt, results, "m0", "a", "put", "k1", 1)
        await valve.wait_entered()
        args: list[Value] = ["k2", 2, "b", "put", ["x", 1]]
        nursery.start_soon(_call_into, vrt, results, "m1", "a", "put_and_call", *args)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)
        assert not target_dir.exists()  # facet b was not reached yet
        valve.release()
    assert results == {"m0": None, "m1": None}
    assert await vrt.call(TENANT, "b", "get", "x") == 1


async def test_many_callers_share_commits(rt: Runtime) -> None:
    async def caller() -> None:
        for _ in range(20):
            await rt.call(TENANT, "c", "increment", cls="Counter")

    async with trio.open_nursery() as nursery:
        for _ in range(32):
            nursery.start_soon(caller)
    assert await rt.call(TENANT, "c", "get") == 640
    stats = rt.statistics()
    assert stats.committed_envelopes == 640
    assert stats.commits < 640  # group commit happened
