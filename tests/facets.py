"""Facet classes the tests host. Each shows one behaviour; none is a mock of ours."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from facetrt import Facet, rpc
from facetrt.examples import AgentMemory, Counter

if TYPE_CHECKING:
    from facetrt import Value


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
    async def put(self, key: str, value: Value) -> None:
        self.storage.put(key, value)

    @rpc
    async def get(self, key: str) -> Value:
        return self.storage.get(key)


CLASSES: dict[str, type[Facet]] = {
    "Counter": Counter,
    "AgentMemory": AgentMemory,
    "Register": Register,
    "Gate": Gate,
}
