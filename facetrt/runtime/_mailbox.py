"""Envelope and Mailbox: the bounded queue in front of each facet.

A mailbox belongs to the facet's slot in the router, not to one activation, so envelopes queued
while an activation passivates or resets are handled by the next activation instead of lost.
``put_nowait`` sheds with :class:`OverloadedError` before anything is queued past either bound:
the length (the tenant's mailbox quota) or the age of the oldest queued envelope
(``mailbox_age_seconds_max``). The age bound sheds as soon as the facet is known to be that
far behind, rather than once its mailbox has filled up: a caller learns at once that it
should back off, and no memory is spent on messages that would wait longer than the bound.
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
    oldest_enqueued_at: float | None  # trio time; None when empty


@final
class Mailbox:
    """A bounded FIFO of envelopes with one consumer (the current activation).

    Args:
        envelopes_max: most envelopes queued (the tenant's mailbox quota).
        age_seconds_max: shed new envelopes while the oldest queued one is older than this.
    """

    def __init__(self, envelopes_max: int, *, age_seconds_max: float) -> None:
        # The queue itself, oldest first. Public for the one consumer's hot loop (a popleft
        # and a truth test cost no Python call); its identity never changes, so a consumer
        # may keep a reference. Everything else goes through the methods below.
        self.items: deque[Envelope] = deque()
        self.envelopes_max = envelopes_max
        self._age_seconds_max = age_seconds_max
        self._lot = trio.lowlevel.ParkingLot()
        self._consumer_parked = False  # ParkingLot.__bool__ is a Python call; put is hot

    def __len__(self) -> int:
        return len(self.items)

    def is_full(self) -> bool:
        return len(self.items) >= self.envelopes_max

    def put_nowait(self, envelope: Envelope) -> None:
        """Queue ``envelope`` or raise :class:`OverloadedError`; never checkpoints.

        The age is measured at ``envelope.enqueued_at`` (its arrival, read once by the caller),
        so the check costs no clock read.
        """
        items = self.items
        if items:  # both bounds need a queued envelope (envelopes_max >= 1)
            if len(items) >= self.envelopes_max:
                raise OverloadedError(
                    f"facet mailbox is full ({self.envelopes_max} envelopes queued)"
                )
            waited = envelope.enqueued_at - items[0].enqueued_at
            if waited > self._age_seconds_max:
                raise OverloadedError(
                    f"facet is behind: its oldest queued message has waited {waited:.3g} s "
                    f"(more than {self._age_seconds_max:g} s)"
                )
        items.append(envelope)
        if self._consumer_parked:
            self._consumer_parked = False  # woken: later puts need not wake it again
            self._lot.unpark_all()

    def oldest_enqueued_at(self) -> float | None:
        """When the oldest queued envelope arrived (trio time); None when empty."""
        return self.items[0].enqueued_at if self.items else None

    def get_nowait(self) -> Envelope | None:
        return self.items.popleft() if self.items else None

    def move_to(self, other: Mailbox) -> None:
        """Move every queued envelope, in order, to the empty mailbox ``other``."""
        assert not other.items
        other.items.extend(self.items)  # in place: each queue keeps its identity
        self.items.clear()

    def remove_if(self, predicate: Callable[[Envelope], bool]) -> list[Envelope]:
        """Take out (in order) the queued envelopes for which ``predicate`` holds."""
        kept: list[Envelope] = []
        removed: list[Envelope] = []
        for envelope in self.items:
            (removed if predicate(envelope) else kept).append(envelope)
        self.items.clear()  # in place: the queue keeps its identity
        self.items.extend(kept)
        return removed

    def wake(self) -> None:
        """Wake the consumer without an envelope (a stop request, a finished commit).

        Only a parked consumer needs it: one that is running checks for a stop before it
        parks again, with no checkpoint in between (and every commit's completion calls this).
        """
        if self._consumer_parked:
            self._consumer_parked = False
            self._lot.unpark_all()

    async def wait_nonempty(self) -> None:
        """Return once an envelope is queued or :meth:`wake` was called; always checkpoints."""
        if self.items:
            await trio.lowlevel.checkpoint()
            return
        self._consumer_parked = True
        try:
            await self._lot.park()
        finally:
            self._consumer_parked = False

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(
            depth=len(self.items),
            depth_max=self.envelopes_max,
            oldest_enqueued_at=self.oldest_enqueued_at(),
        )
