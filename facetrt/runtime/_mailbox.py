"""Envelope and Mailbox: the bounded queue in front of each facet.

A mailbox belongs to the facet's slot in the router, not to one activation, so envelopes queued
while an activation passivates or resets are handled by the next activation instead of lost.
``put_nowait`` sheds with :class:`OverloadedError` before anything is queued past the bound.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import trio

from .._errors import OverloadedError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._ids import FacetAddress
    from .._values import Value
    from ._reply import ReplySlot


@dataclass(slots=True)
class Envelope:
    """One message to a facet, with the slot its caller waits on.

    Positional construction allowed (not keyword-only): one is built per call.
    """

    method: str
    args: list[Value]
    kwargs: dict[str, Value]
    cls: str | None
    idempotency_key: str | None
    chain: tuple[FacetAddress, ...]
    reply: ReplySlot
    enqueued_at: float
    internal: bool = False  # an operator's inspection, not a facet message


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxStatistics:
    depth: int
    depth_max: int


@final
class Mailbox:
    """A bounded FIFO of envelopes with one consumer (the current activation)."""

    def __init__(self, envelopes_max: int) -> None:
        self._items: deque[Envelope] = deque()
        self._envelopes_max = envelopes_max
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, envelope: Envelope) -> None:
        """Queue ``envelope`` or raise :class:`OverloadedError`; never checkpoints."""
        if len(self._items) >= self._envelopes_max:
            raise OverloadedError(f"facet mailbox is full ({self._envelopes_max} envelopes queued)")
        self._items.append(envelope)
        if self._lot:
            self._lot.unpark_all()

    def get_nowait(self) -> Envelope | None:
        return self._items.popleft() if self._items else None

    def move_to(self, other: Mailbox) -> None:
        """Move every queued envelope, in order, to the empty mailbox ``other``."""
        assert not other._items
        other._items, self._items = self._items, deque()

    def remove_if(self, predicate: Callable[[Envelope], bool]) -> list[Envelope]:
        """Take out (in order) the queued envelopes for which ``predicate`` holds."""
        kept: deque[Envelope] = deque()
        removed: list[Envelope] = []
        for envelope in self._items:
            (removed if predicate(envelope) else kept).append(envelope)
        self._items = kept
        return removed

    def wake(self) -> None:
        """Wake the consumer without an envelope (a stop request)."""
        self._lot.unpark_all()

    async def wait_nonempty(self) -> None:
        """Return once an envelope is queued or :meth:`wake` was called; always checkpoints."""
        if self._items:
            await trio.lowlevel.checkpoint()
            return
        await self._lot.park()

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(depth=len(self._items), depth_max=self._envelopes_max)
