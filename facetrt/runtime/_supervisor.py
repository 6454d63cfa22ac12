"""Supervisor: bounds open activations at ``open_facets_max`` and evicts idle ones (LRU).

An activation takes a permit before it opens its store and gives it back after the store is
closed. When none is free, the least recently idle activation is asked to passivate; if no
activation is idle (every open facet is busy), the new one is refused with ``overloaded``
rather than waiting, since waiting could deadlock facets that call each other.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, final

import trio

from .._errors import OverloadedError

if TYPE_CHECKING:
    from .._ids import FacetAddress
    from ._activation import Activation


@final
class Supervisor:
    def __init__(self, open_facets_max: int) -> None:
        self._open_max = open_facets_max
        self._open = 0
        self._stopping = 0
        self._idle: OrderedDict[FacetAddress, Activation] = OrderedDict()
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def open_count(self) -> int:
        return self._open

    async def acquire(self) -> None:
        """Take an open permit, evicting the least recently used idle activation if needed.

        Raises:
            OverloadedError: every open activation is busy.
        """
        while self._open >= self._open_max:
            if self._idle:
                _, victim = self._idle.popitem(last=False)
                self._stopping += 1
                victim.request_stop(evicted=True)
            elif self._stopping == 0:
                raise OverloadedError(f"node has {self._open_max} open facets and none is idle")
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        self._open += 1

    def release(self, *, evicted: bool) -> None:
        self._open -= 1
        if evicted:
            self._stopping -= 1
        self._lot.unpark()

    def mark_idle(self, activation: Activation) -> None:
        self._idle[activation.address] = activation
        self._idle.move_to_end(activation.address)
        if self._lot:
            # Someone is waiting for a permit: this activation is now the cheapest to evict.
            self._idle.pop(activation.address)
            self._stopping += 1
            activation.request_stop(evicted=True)

    def mark_busy(self, activation: Activation) -> None:
        self._idle.pop(activation.address, None)

    def idle_count(self) -> int:
        return len(self._idle)
