"""The simulation's facet: every write also appends to an append-only log in the facet.

The log is the reference model's input: the checker replays it to get the state the facet
must hold, and finds each operation's place in it by its *tag* (``client:seq``, the same for
every attempt of one operation). So an operation applied twice shows as a repeated tag, a lost
one as a missing tag, and the facet's order as the log's order. Each write's result names its
log index, so the checker also knows that a reply describes the application it claims to.

Layout: ``next`` (log length), ``log/<index:08d>`` -> ``[tag, kind, a, b]``, ``count`` (sum of
every ``add``), ``reg/<key>`` (register values), ``pad/<key>`` (a string of ``pad_bytes(value)``
bytes written with each register value, up to 21 KB: maps start at 64 KiB, so they grow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import trio

from facetrt import Facet, rpc

if TYPE_CHECKING:
    from facetrt import Value

CLASS_NAME = "Sim"
LOG_PREFIX = "log/"
REGISTER_PREFIX = "reg/"
PAD_PREFIX = "pad/"


def pad_bytes(value: int) -> int:
    """The size of the padding written with register value ``value``."""
    return (value % 8) * 3000


class _RolledBack(Exception):
    pass


class SimFacet(Facet):
    """Counter, registers and forwarding, each write logged (see the module docstring).

    ``sleep`` makes a handler slow (trio time): before its first write, or between its
    writes so that a handler cancelled halfway shows whether half a message can survive.
    """

    # Turns that began while another turn of the same activation was running: the input gate
    # broken. A list the harness empties before each run (one run at a time per process).
    overlapping_turns: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self._turn: str | None = None

    def _enter(self, tag: str) -> None:
        if self._turn is not None:
            SimFacet.overlapping_turns.append(f"{self.agent_id}: {tag} began inside {self._turn}")
        self._turn = tag

    def _append(self, tag: str, kind: str, first: Value, second: Value) -> int:
        index = self.storage.get("next", 0)
        assert isinstance(index, int)
        self.storage.put(f"{LOG_PREFIX}{index:08d}", [tag, kind, first, second])
        self.storage.put("next", index + 1)
        return index

    def _add(self, tag: str, by: int) -> list[Value]:
        index = self._append(tag, "add", by, None)
        count = self.storage.get("count", 0)
        assert isinstance(count, int)
        self.storage.put("count", count + by)
        return [count + by, index]

    @rpc
    async def add(self, tag: str, by: int, sleep: float = 0.0, fail: bool = False) -> list[Value]:
        """Add ``by`` to the counter; return ``[count, log index]``. ``fail`` raises after
        writing (those writes must vanish)."""
        self._enter(tag)
        try:
            if sleep:
                await trio.sleep(sleep / 2)
            result = self._add(tag, by)
            if sleep:
                await trio.sleep(sleep / 2)
            if fail:
                raise ValueError("failing on purpose after writing")
            return result
        finally:
            self._turn = None

    def _rolled_back_block(self, key: str) -> None:
        """Writes in a ``transaction()`` block that raises: none may survive (the checker
        would see the register at -1 or the log length at -1)."""
        try:
            with self.storage.transaction():
                self.storage.put(f"{REGISTER_PREFIX}{key}", -1)
                self.storage.put("next", -1)
                raise _RolledBack
        except _RolledBack:
            pass

    @rpc
    async def put(self, tag: str, key: str, value: int, sleep: float = 0.0) -> int:
        """Set register ``key``; return the log index."""
        self._enter(tag)
        try:
            if sleep:
                await trio.sleep(sleep)
            if value % 3 == 0:
                self._rolled_back_block(key)
            index = self._append(tag, "put", key, value)
            self.storage.put(f"{REGISTER_PREFIX}{key}", value)
            pad = pad_bytes(value)
            if pad:
                self.storage.put(f"{PAD_PREFIX}{key}", "x" * pad)
            else:
                self.storage.delete(f"{PAD_PREFIX}{key}")
            return index
        finally:
            self._turn = None

    @rpc
    async def get(self, tag: str, key: str) -> list[Value]:
        """Register ``key`` and the log length it was read at: ``[value, length]``."""
        self._enter(tag)
        try:
            return [self.storage.get(f"{REGISTER_PREFIX}{key}"), self.storage.get("next", 0)]
        finally:
            self._turn = None

    @rpc
    async def forward(
        self, tag: str, target: str, by: int, key: str | None, sleep: float = 0.0
    ) -> list[Value]:
        """Log the forward here, then ``add`` on facet ``target`` (with ``key`` + ``/in`` as
        its idempotency key when given); return ``[log index, target's result]``."""
        self._enter(tag)
        try:
            index = self._append(tag, "forward", target, by)
            if sleep:
                await trio.sleep(sleep)
            inner_key = None if key is None else f"{key}/in"
            inner = await self.facets.call(
                target, "add", tag, by, cls=CLASS_NAME, idempotency_key=inner_key
            )
            return [index, inner]
        finally:
            self._turn = None

    @rpc
    async def snapshot(self) -> dict[str, Value]:
        """The whole state, for the final check."""
        log = self.storage.list(prefix=LOG_PREFIX)
        registers = self.storage.list(prefix=REGISTER_PREFIX)
        pads = self.storage.list(prefix=PAD_PREFIX)
        keys: list[Value] = []
        keys.extend(sorted(log))
        return {
            "next": self.storage.get("next", 0),
            "count": self.storage.get("count", 0),
            "log": [log[name] for name in sorted(log)],
            "log_keys": keys,
            "registers": {name.removeprefix(REGISTER_PREFIX): v for name, v in registers.items()},
            "pads": {
                name.removeprefix(PAD_PREFIX): len(pad) if isinstance(pad, str) else -1
                for name, pad in pads.items()
            },
        }


CLASSES: dict[str, type[Facet]] = {CLASS_NAME: SimFacet}
