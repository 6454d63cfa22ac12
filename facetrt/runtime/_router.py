"""Router: FacetAddress -> slot (mailbox + current activation); starts activations on demand.

A slot outlives its activations: while one passivates or resets, envelopes keep queueing in the
slot's mailbox, and a new activation is started for them as soon as the old one has closed its
store (a store is never open twice). A slot is dropped when its activation stopped and its
mailbox is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import outcome
import trio

from .._errors import NotFoundError, OverloadedError, UnavailableError
from ._activation import Activation
from ._mailbox import Mailbox

if TYPE_CHECKING:
    from .._ids import FacetAddress
    from ._core import RuntimeCore
    from ._mailbox import Envelope
    from ._supervisor import Supervisor


@dataclass(slots=True)
class _Slot:
    mailbox: Mailbox
    activation: Activation | None = None


@final
class Router:
    def __init__(self, *, core: RuntimeCore, supervisor: Supervisor, nursery: trio.Nursery) -> None:
        self._core = core
        self._supervisor = supervisor
        self._nursery = nursery
        self._slots: dict[FacetAddress, _Slot] = {}
        self._emptied = trio.lowlevel.ParkingLot()

    def submit(self, address: FacetAddress, envelope: Envelope) -> None:
        """Queue ``envelope`` for ``address``, activating the facet if needed. Never blocks.

        Raises:
            NotFoundError: no class given and the facet was never created.
            OverloadedError: the facet's mailbox is full.
        """
        slot = self._slots.get(address)
        if slot is None:
            if envelope.cls is None and not self._core.registry.exists(address):
                raise NotFoundError(f"facet {str(address)!r} does not exist (give a class)")
            slot = _Slot(Mailbox(self._core.config.mailbox_envelopes_max))
            self._slots[address] = slot
        try:
            slot.mailbox.put_nowait(envelope)
        except OverloadedError:
            self._core.counters.overloaded += 1
            raise
        if slot.activation is None:
            self._activate(address, slot)

    def _activate(self, address: FacetAddress, slot: _Slot) -> None:
        activation = Activation(
            address=address, mailbox=slot.mailbox, core=self._core, supervisor=self._supervisor
        )
        slot.activation = activation
        if self._core.closing:
            activation.request_stop()  # drain what is queued, then passivate
        self._nursery.start_soon(self._run, address, slot, activation)

    async def _run(self, address: FacetAddress, slot: _Slot, activation: Activation) -> None:
        try:
            await activation.run()
        finally:
            slot.activation = None
            if self._core.stopped:
                error = UnavailableError("runtime closed before the message was handled")
                while (envelope := slot.mailbox.get_nowait()) is not None:
                    envelope.reply.set(outcome.Error(error))
            if slot.mailbox:
                self._activate(address, slot)
            else:
                del self._slots[address]
                if not self._slots:
                    self._emptied.unpark_all()

    async def wait_empty(self) -> None:
        """Return once no facet has an activation or a queued envelope."""
        while self._slots:
            await self._emptied.park()

    def activations(self) -> list[Activation]:
        return [slot.activation for slot in self._slots.values() if slot.activation is not None]

    def queued_envelopes(self) -> int:
        return sum(len(slot.mailbox) for slot in self._slots.values())

    def slot_count(self) -> int:
        return len(self._slots)
