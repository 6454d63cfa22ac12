"""Facet-to-facet calls, re-entrancy detection and idempotency keys (SPEC §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import pytest
import trio

from facetrt import (
    BadRequestError,
    ErrorCode,
    Facet,
    ReentrancyError,
    RuntimeConfig,
    open_runtime,
    rpc,
)
from tests.facets import CLASSES

if TYPE_CHECKING:
    from pathlib import Path

    from facetrt import Runtime, Value

TENANT = "acme"


class Tally(Facet):
    """Counts how often its handler really ran, in storage."""

    @rpc
    async def add(self, by: int) -> dict[str, int]:
        runs = self.storage.get("runs", 0)
        total = self.storage.get("total", 0)
        assert isinstance(runs, int)
        assert isinstance(total, int)
        self.storage.put_many({"runs": runs + 1, "total": total + by})
        return {"runs": runs + 1, "total": total + by}

    @rpc
    async def fail(self) -> None:
        self.storage.put("runs", -1)
        raise RuntimeError("no")

    @rpc
    async def runs(self) -> int:
        value = self.storage.get("runs", 0)
        assert isinstance(value, int)
        return value


class Pinger(Facet):
    """Waits, then calls another facet: two of them calling each other meet halfway."""

    @rpc
    async def ping(self, others: list[Value], seconds: float) -> str:
        await trio.sleep(seconds)
        if not others:
            return f"pong from {self.agent_id}"
        return str(await self.facets.call(str(others[0]), "ping", others[1:], 0.0, cls="Pinger"))


class Asker(Facet):
    """Asks another facet; records which task asked and when the answer was given."""

    task: ClassVar[trio.lowlevel.Task | None] = None
    answered: ClassVar[bool] = False

    @rpc
    async def ask(self, other: str) -> Value:
        Asker.task = trio.lowlevel.current_task()
        return await self.facets.call(other, "answer", cls="Asker")

    @rpc
    async def answer(self) -> str:
        Asker.answered = True
        return "yes"


class _WaitingOnAtResume(trio.abc.Instrument):
    """What the asking activation says it waits on when its task resumes with the answer."""

    def __init__(self, rt: Runtime, agent_id: str) -> None:
        self.rt = rt
        self.address = rt.core.address_of(TENANT, agent_id)
        self.seen: list[object] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is Asker.task and Asker.answered and not self.seen:
            router = self.rt.core.router
            assert router is not None
            activation = router.running_activation(self.address)
            assert activation is not None
            self.seen.append(activation.waiting_on)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_facet_calls_another_facet_of_its_tenant(rt: Runtime) -> None:
    result = await rt.call(TENANT, "a", "call", "b", "increment", [5], "Counter", cls="Register")
    assert result == 5
    assert await rt.call(TENANT, "b", "get") == 5
    with pytest.raises(Exception, match="does not exist"):
        await rt.call("other", "b", "get")  # same agent id, other tenant: another facet


async def test_calling_itself_is_reentrancy(rt: Runtime) -> None:
    with pytest.raises(ReentrancyError) as info:
        await rt.call(TENANT, "a", "call", "a", "get", ["k"], None, cls="Register")
    assert info.value.code is ErrorCode.REENTRANCY


async def test_cycle_through_another_facet_is_reentrancy_not_deadlock(rt: Runtime) -> None:
    await rt.call(TENANT, "b", "put", "k", 1, cls="Register")
    # a -> b -> a: b's call back into a fails at once; the error reaches the caller.
    with pytest.raises(ReentrancyError, match="acme/a -> acme/b -> acme/a"):
        await rt.call(
            TENANT, "a", "call", "b", "call", ["a", "get", ["k"], None], None, cls="Register"
        )
    # Both facets still work.
    assert await rt.call(TENANT, "a", "call", "b", "get", ["k"], None) == 1


@pytest.mark.parametrize("ring", [["a", "b"], ["a", "b", "c"]])
async def test_facets_calling_each_other_from_separate_chains_fail_instead_of_deadlocking(
    data_dir: Path, ring: list[str]
) -> None:
    # a calls b while b calls a (or a -> b -> c -> a), each from its own caller: no call
    # chain holds a facet twice, yet each waits on the next one's reply for ever. The call
    # that closes the cycle fails at once; the others then complete.
    outcomes: dict[str, object] = {}

    async def ping(index: int) -> None:
        others: list[Value] = [ring[(index + 1) % len(ring)]]  # the next facet in the ring
        try:
            outcomes[ring[index]] = await rt.call(
                TENANT, ring[index], "ping", others, 0.05, cls="Pinger"
            )
        except ReentrancyError as exc:
            outcomes[ring[index]] = exc

    async with open_runtime(data_dir, classes={"Pinger": Pinger}) as rt:
        # Real time (writer threads and an autojump clock do not mix); a deadlock would
        # hit this bound, a pass takes a few handler sleeps.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index in range(len(ring)):
                    nursery.start_soon(ping, index)
    refused = [o for o in outcomes.values() if isinstance(o, ReentrancyError)]
    assert len(outcomes) == len(ring)
    assert len(refused) == 1
    assert "would deadlock" in refused[0].message
    assert all(f"{TENANT}/{agent}" in refused[0].message for agent in ring)
    answered = [o for o in outcomes.values() if not isinstance(o, ReentrancyError)]
    assert all(isinstance(o, str) and o.startswith("pong from") for o in answered), answered


async def test_a_facet_stops_waiting_when_its_answer_arrives_not_when_it_resumes(
    data_dir: Path,
) -> None:
    # Between the reply being set and the caller's task resuming, another facet may check for
    # wait cycles: the caller must not still count as waiting, or that check refuses a call
    # that could not deadlock (the sim saw such spurious refusals).
    Asker.task, Asker.answered = None, False
    async with open_runtime(data_dir, classes={"Asker": Asker}) as rt:
        watcher = _WaitingOnAtResume(rt, "x")
        trio.lowlevel.add_instrument(watcher)
        try:
            assert await rt.call(TENANT, "x", "ask", "y", cls="Asker") == "yes"
        finally:
            trio.lowlevel.remove_instrument(watcher)
    assert watcher.seen == [None]


async def test_call_chains_are_bounded(data_dir: Path) -> None:
    config = RuntimeConfig(call_depth_max=3, commit_threads=2)
    async with open_runtime(data_dir, classes=CLASSES, config=config) as rt:
        await rt.call(TENANT, "d", "put", "k", 1, cls="Register")
        chain: list[object] = ["d", "get", ["k"], None]
        for agent in ["c", "b"]:
            chain = [agent, "call", chain, "Register"]
        assert await rt.call(TENANT, "a", "call", *chain, cls="Register") == 1  # type: ignore[arg-type]
        chain = ["z", "call", chain, "Register"]
        with pytest.raises(BadRequestError, match="call chain"):
            await rt.call(TENANT, "y", "call", *chain, cls="Register")  # type: ignore[arg-type]


async def test_idempotent_call_runs_once_and_survives_restart(data_dir: Path) -> None:
    classes = {"Tally": Tally}
    async with open_runtime(data_dir, classes=classes) as rt:
        first = await rt.call(TENANT, "t", "add", 5, cls="Tally", idempotency_key="op-1")
        again = await rt.call(TENANT, "t", "add", 5, cls="Tally", idempotency_key="op-1")
        assert first == again == {"runs": 1, "total": 5}
        assert await rt.call(TENANT, "t", "runs") == 1
    async with open_runtime(data_dir, classes=classes) as rt:
        after_restart = await rt.call(TENANT, "t", "add", 5, idempotency_key="op-1")
        assert after_restart == {"runs": 1, "total": 5}
        assert await rt.call(TENANT, "t", "runs") == 1
        other = await rt.call(TENANT, "t", "add", 5, idempotency_key="op-2")
        assert other == {"runs": 2, "total": 10}


async def test_idempotency_key_for_another_method_is_refused(data_dir: Path) -> None:
    async with open_runtime(data_dir, classes={"Tally": Tally}) as rt:
        await rt.call(TENANT, "t", "add", 1, cls="Tally", idempotency_key="k")
        with pytest.raises(BadRequestError, match="idempotency key"):
            await rt.call(TENANT, "t", "runs", idempotency_key="k")


async def test_failed_idempotent_call_is_not_remembered(data_dir: Path) -> None:
    async with open_runtime(data_dir, classes={"Tally": Tally}) as rt:
        for _ in range(2):
            with pytest.raises(Exception, match="RuntimeError"):
                await rt.call(TENANT, "t", "fail", cls="Tally", idempotency_key="f")
        assert await rt.call(TENANT, "t", "runs") == 0


async def test_idempotent_results_expire_after_retention(data_dir: Path) -> None:
    clock = Clock()
    config = RuntimeConfig(idempotency_retention_seconds=60, commit_threads=2)
    async with open_runtime(
        data_dir, classes={"Tally": Tally}, config=config, wall_clock=clock
    ) as rt:
        await rt.call(TENANT, "t", "add", 1, cls="Tally", idempotency_key="k")
        clock.now += 59
        assert await rt.call(TENANT, "t", "add", 1, idempotency_key="k") == {"runs": 1, "total": 1}
        clock.now += 2
        assert await rt.call(TENANT, "t", "add", 1, idempotency_key="k") == {"runs": 2, "total": 2}


async def test_concurrent_duplicates_run_once(data_dir: Path) -> None:
    import trio

    results: list[object] = []
    async with open_runtime(data_dir, classes={"Tally": Tally}) as rt:

        async def add() -> None:
            results.append(await rt.call(TENANT, "t", "add", 3, cls="Tally", idempotency_key="x"))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(add)
        assert results == [{"runs": 1, "total": 3}] * 10
        assert await rt.call(TENANT, "t", "runs") == 1
