"""Facet classes the tests host. Each shows one behaviour; none is a mock of ours."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import trio

from facetrt import Facet, rpc
from facetrt.examples import AgentMemory, Counter

if TYPE_CHECKING:
    from facetrt import Timer, Value


class Register(Facet):
    """Generic key-value access to storage, so tests can drive every storage call."""

    def __init__(self) -> None:
        self.activated = 0

    async def on_activate(self) -> None:
        self.activated += 1

    @rpc
    async def put(self, key: str, value: Value) -> None:
        self.storage.put(key, value)

    @rpc
    async def get(self, key: str, default: Value = None) -> Value:
        return self.storage.get(key, default)

    @rpc
    async def cas(self, key: str, expected: Value, value: Value) -> bool:
        """Compare-and-swap, for the linearizability recorder: put ``value`` if ``key`` holds
        ``expected`` (None: absent); return whether it did."""
        current = self.storage.get(key)
        # Same type as well as equal, as the checker's register model compares (1 is not True).
        if type(current) is not type(expected) or current != expected:
            return False
        self.storage.put(key, value)
        return True

    @rpc
    async def put_then_fail(self, key: str, value: Value) -> None:
        self.storage.put(key, value)
        raise ValueError("failing on purpose")

    @rpc
    async def put_many(self, entries: dict[str, Value]) -> None:
        self.storage.put_many(entries)

    @rpc
    async def dump(self) -> dict[str, Value]:
        return self.storage.list()

    @rpc
    async def activations(self) -> int:
        return self.activated

    @rpc
    async def bad_result(self) -> Value:
        self.storage.put("written", True)
        return {1, 2}  # type: ignore[return-value]  # a set is not a msgpack value, on purpose

    @rpc
    async def sleep_then_put(self, seconds: float, key: str, value: Value) -> None:
        await trio.sleep(seconds)
        self.storage.put(key, value)

    @rpc
    async def call(self, agent_id: str, method: str, args: list[Value], cls: str | None) -> Value:
        """Call another facet (for re-entrancy and output-gate tests)."""
        return await self.facets.call(agent_id, method, *args, cls=cls)

    @rpc
    async def put_and_call(
        self, key: str, value: Value, agent_id: str, method: str, args: list[Value]
    ) -> Value:
        self.storage.put(key, value)
        return await self.facets.call(agent_id, method, *args, cls="Register")


class Gate(Facet):
    """Handlers that block on a per-agent trio.Event set by the test (in-process only)."""

    events: dict[str, trio.Event] = {}  # noqa: RUF012 - tests share events by agent id

    @rpc
    async def wait_and_put(self, key: str, value: Value) -> None:
        self.storage.put(key, value)
        await Gate.events[self.agent_id].wait()

    @rpc
    async def wait_and_fail(self, key: str) -> None:
        self.storage.put(key, "never committed")
        await Gate.events[self.agent_id].wait()
        raise ValueError("failed after waiting")

    @rpc
    async def put(self, key: str, value: Value) -> None:
        self.storage.put(key, value)

    @rpc
    async def get(self, key: str) -> Value:
        return self.storage.get(key)


class Alarm(Facet):
    """Sets timers on request; ``on_timer`` counts each delivery in storage (``fired/<name>``)
    and in :attr:`deliveries`, and fails while the payload's ``fail_until`` >= the attempt."""

    # (agent, name, payload, attempt, trio time) of every delivery, failed ones included.
    deliveries: ClassVar[list[tuple[str, str, Value, int, float]]] = []
    delivered: ClassVar[trio.lowlevel.ParkingLot] = trio.lowlevel.ParkingLot()

    @classmethod
    async def wait_deliveries(cls, count: int, *, seconds: float = 100_000) -> None:
        """Wait (in trio time) until ``count`` deliveries happened; no polling, so trio's
        autojump clock only ever jumps to the runtime's own deadlines."""
        with trio.fail_after(seconds):
            while len(cls.deliveries) < count:
                await cls.delivered.park()

    @rpc
    async def script(self, operations: list[list[Value]]) -> list[Value]:
        """Run timer operations in one message: ["set", name, after_seconds, payload],
        ["cancel", name], ["get", name], ["list"]; return each one's result."""
        results: list[Value] = []
        for operation in operations:
            kind, *args = operation
            if kind == "set":
                name, after, payload = args
                assert isinstance(name, str)
                assert isinstance(after, int | float)
                self.timers.set(name, after_seconds=after, payload=payload)
                results.append(None)
            elif kind == "cancel":
                assert isinstance(args[0], str)
                results.append(self.timers.cancel(args[0]))
            elif kind == "get":
                assert isinstance(args[0], str)
                timer = self.timers.get(args[0])
                results.append(None if timer is None else _timer_dict(timer))
            else:
                results.append([_timer_dict(timer) for timer in self.timers.list()])
        return results

    @rpc
    async def set(
        self,
        name: str,
        at: float | None = None,
        after_seconds: float | None = None,
        payload: Value = None,
    ) -> None:
        self.timers.set(name, at=at, after_seconds=after_seconds, payload=payload)

    @rpc
    async def set_many(self, delays: dict[str, float]) -> None:
        for name, delay in delays.items():
            self.timers.set(name, after_seconds=delay, payload=name)

    @rpc
    async def set_then_fail(self, name: str, after_seconds: float) -> None:
        self.timers.set(name, after_seconds=after_seconds)
        raise ValueError("failing on purpose")

    @rpc
    async def set_in_rolled_back_transaction(self, kept: str, dropped: str) -> None:
        self.timers.set(kept, after_seconds=10)
        try:
            with self.storage.transaction():
                self.timers.set(dropped, after_seconds=10)
                self.timers.cancel(kept)
                raise ValueError("roll the block back")
        except ValueError:
            pass

    @rpc
    async def cancel(self, name: str) -> bool:
        return self.timers.cancel(name)

    @rpc
    async def get(self, name: str) -> Value:
        timer = self.timers.get(name)
        return None if timer is None else _timer_dict(timer)

    @rpc
    async def list_timers(self) -> list[Value]:
        return [_timer_dict(timer) for timer in self.timers.list()]

    @rpc
    async def fired(self) -> dict[str, Value]:
        return {
            key.removeprefix("fired/"): n for key, n in self.storage.list(prefix="fired/").items()
        }

    async def on_timer(self, name: str, payload: Value, attempt: int) -> None:
        Alarm.deliveries.append((self.agent_id, name, payload, attempt, trio.current_time()))
        Alarm.delivered.unpark_all()
        key = f"fired/{name}"
        count = self.storage.get(key, 0)
        assert isinstance(count, int)
        self.storage.put(key, count + 1)
        if isinstance(payload, dict):
            fail_until = payload.get("fail_until", 0)
            assert isinstance(fail_until, int)
            if attempt <= fail_until:
                raise RuntimeError(f"failing attempt {attempt} on purpose")


def _timer_dict(timer: Timer) -> dict[str, Value]:
    return {
        "name": timer.name,
        "at": timer.at,
        "payload": timer.payload,
        "attempts": timer.attempts,
        "failed": timer.failed,
        "error": timer.error,
    }


class Fetcher(Facet):
    """Outbound HTTP through ``self.fetch``; answers what facet code received."""

    @rpc
    async def request(
        self,
        url: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: str | None = None,
        json: Value = None,
    ) -> dict[str, Value]:
        options: dict[str, Any] = {"method": method, "headers": headers, "body": body}
        response = await self.fetch(url, json=json, **options)
        return {
            "status": response.status,
            "headers": [list(pair) for pair in response.headers],
            "text": response.text,
            "url": response.url,
        }

    @rpc
    async def put(self, key: str, value: Value) -> None:
        self.storage.put(key, value)


class SlowStart(Facet):
    """``on_activate`` waits for ``SlowStart.gate`` when one is set (in-process only)."""

    gate: trio.Event | None = None

    async def on_activate(self) -> None:
        if SlowStart.gate is not None:
            await SlowStart.gate.wait()

    @rpc
    async def put(self, key: str, value: Value) -> None:
        self.storage.put(key, value)


CLASSES: dict[str, type[Facet]] = {
    "Counter": Counter,
    "AgentMemory": AgentMemory,
    "Register": Register,
    "Gate": Gate,
    "Alarm": Alarm,
    "Fetcher": Fetcher,
    "SlowStart": SlowStart,
}
