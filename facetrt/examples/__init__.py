"""Example facets: a counter, and the memory of a conversational agent.

``AgentMemory`` shows ordered keys with ``list``, atomic multi-key updates with
``transaction()`` and a facet-to-facet call (a per-tenant ``Counter`` of all turns).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import BadRequestError
from ..runtime import Facet, rpc

if TYPE_CHECKING:
    from .._values import Value

ROLES = ("user", "assistant", "tool", "system")
TURN_PREFIX = "turn:"
STATS_AGENT = "stats/turns"


class Counter(Facet):
    """A durable counter."""

    @rpc
    async def increment(self, by: int = 1) -> int:
        value = self.storage.get("count", 0)
        assert isinstance(value, int)
        self.storage.put("count", value + by)
        return value + by

    @rpc
    async def get(self) -> int:
        value = self.storage.get("count", 0)
        assert isinstance(value, int)
        return value

    @rpc
    async def reset(self) -> None:
        self.storage.delete("count")


class AgentMemory(Facet):
    """Conversation memory of one agent: ordered turns plus per-role counts.

    Turns live under ``turn:<12-digit sequence>`` so that ``list`` returns them in order;
    ``meta:next`` and ``count:<role>`` change in the same transaction as the turn they count.
    """

    @rpc
    async def append_turn(self, role: str, text: str, tokens: int = 0) -> int:
        """Append a turn; return its sequence number. Also counts it tenant-wide."""
        if role not in ROLES:
            raise BadRequestError(f"role must be one of {ROLES}, got {role!r}")
        with self.storage.transaction():
            seq = self.storage.get("meta:next", 0)
            assert isinstance(seq, int)
            self.storage.put(
                f"{TURN_PREFIX}{seq:012d}", {"role": role, "text": text, "tokens": tokens}
            )
            self.storage.put("meta:next", seq + 1)
            count = self.storage.get(f"count:{role}", 0)
            assert isinstance(count, int)
            self.storage.put(f"count:{role}", count + 1)
        # Another facet of the same tenant keeps the total: a facet-to-facet call, made after
        # this facet's earlier writes are durable (the output gate).
        await self.facets.call(STATS_AGENT, "increment", cls="Counter")
        return seq

    @rpc
    async def last(self, n: int = 10) -> list[Value]:
        """The last ``n`` turns, oldest first."""
        turns = self.storage.list(prefix=TURN_PREFIX, reverse=True, limit=max(1, n))
        return list(reversed(list(turns.values())))

    @rpc
    async def summary(self) -> dict[str, Value]:
        """Turn counts per role, total tokens and the number of turns."""
        counts = {
            key.removeprefix("count:"): value
            for key, value in self.storage.list(prefix="count:").items()
        }
        tokens = 0
        for turn in self.storage.list(prefix=TURN_PREFIX).values():
            assert isinstance(turn, dict)
            value = turn.get("tokens", 0)
            tokens += value if isinstance(value, int) else 0
        return {"turns": self.storage.get("meta:next", 0), "by_role": counts, "tokens": tokens}

    @rpc
    async def forget(self, keep_last: int = 0) -> int:
        """Delete all but the last ``keep_last`` turns; return how many were deleted."""
        keys = list(self.storage.list(prefix=TURN_PREFIX))
        doomed = keys[: max(0, len(keys) - keep_last)]
        return self.storage.delete_many(doomed)


CLASSES: dict[str, type[Facet]] = {"Counter": Counter, "AgentMemory": AgentMemory}
