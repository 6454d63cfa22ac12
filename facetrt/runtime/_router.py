"""Router: FacetAddress -> slot (mailbox + current activation); starts activations on demand.

A slot outlives its activations: while one passivates or resets, envelopes keep queueing in the
slot's mailbox, and a new activation is started for them as soon as the old one has closed its
store (a store is never open twice). A slot is dropped when its activation stopped, its
mailbox is empty and no hold is on it.

Holds (operators' data operations, decision 0008). :meth:`Router.hold` gives one task the
facet's store exclusively: the slot is marked held, queued envelopes move to a fresh mailbox
the current activation never sees (it finishes the message it is handling, flushes and closes
its store), and no activation starts until the hold ends. Envelopes keep queueing meanwhile
(bounded by the mailbox) and are handled against the new state afterwards; those without a
class fail ``not_found`` if the operation left no facet. :meth:`Router.reading` lends a store
for a snapshot: a running activation is pinned and keeps serving; without one, the slot is
held while the store is opened directly. The normal call path pays nothing for either: the
held flag is only read where an activation would start or a slot be dropped.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, final

import outcome
import trio

from .._errors import NotFoundError, OverloadedError, UnavailableError
from ._activation import Activation, ActivationState
from ._mailbox import Mailbox

CLEANUP_SECONDS = 30.0  # as Runtime.aclose's cleanup bound

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .._ids import FacetAddress
    from ..storage import FacetStore
    from ._core import RuntimeCore
    from ._mailbox import Envelope
    from ._supervisor import Supervisor


_PINNABLE = (ActivationState.STARTING, ActivationState.RUNNING)


@dataclass(slots=True)
class _Slot:
    mailbox: Mailbox
    activation: Activation | None = None
    held: bool = False  # a data operation owns the store: no activation may start


@final
class Router:
    def __init__(self, *, core: RuntimeCore, supervisor: Supervisor, nursery: trio.Nursery) -> None:
        self._core = core
        self._supervisor = supervisor
        self._nursery = nursery
        self._slots: dict[FacetAddress, _Slot] = {}
        self._closed_tenants: set[str] = set()  # being deleted: nothing of theirs may start
        self._emptied = trio.lowlevel.ParkingLot()
        # Woken when an activation ends or a hold is released: holds wait on it (rare).
        self._maintenance = trio.lowlevel.ParkingLot()

    def submit(self, address: FacetAddress, envelope: Envelope) -> None:
        """Queue ``envelope`` for ``address``, activating the facet if needed. Never blocks.

        Raises:
            NotFoundError: no class given and the facet was never created.
            OverloadedError: the facet's mailbox is full, or its oldest queued message is
                older than ``mailbox_age_seconds_max`` (counted by reason).
        """
        if self._closed_tenants and address.tenant_id in self._closed_tenants:
            raise NotFoundError(f"tenant {address.tenant_id!r} is being deleted")
        slot = self._slots.get(address)
        if slot is None:
            if envelope.cls is None and not self._core.registry.exists(address):
                raise NotFoundError(f"facet {str(address)!r} does not exist (give a class)")
            slot = _Slot(self._new_mailbox(address))
            self._slots[address] = slot
        try:
            slot.mailbox.put_nowait(envelope)
        except OverloadedError:
            self._shed(slot)
            raise
        if slot.activation is None and not slot.held:
            self._activate(address, slot)

    def _shed(self, slot: _Slot) -> None:
        """Count a refused envelope by reason (on the refusal path only). A refusing slot
        has envelopes queued, so it is never a fresh one to drop."""
        self._core.counters.overloaded += 1
        self._core.quotas.refused("mailbox" if slot.mailbox.is_full() else "mailbox_age")

    def _new_mailbox(self, address: FacetAddress) -> Mailbox:
        quotas = self._core.quotas.effective(address.tenant_id)
        return Mailbox(
            quotas.mailbox_envelopes_max,
            age_seconds_max=self._core.config.mailbox_age_seconds_max,
        )

    def set_mailbox_bound(self, tenant: str, envelopes_max: int) -> None:
        """Apply a changed mailbox quota to ``tenant``'s live mailboxes (a linear scan:
        operators only). Envelopes already queued past a lowered bound stay; new ones are
        shed until the mailbox drains below it."""
        for address, slot in self._slots.items():
            if address.tenant_id == tenant:
                slot.mailbox.envelopes_max = envelopes_max

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
            # Past the grace period, or cancelled from outside (the runtime's owner was
            # cancelled rather than closed): a new activation would be cancelled before it
            # handled anything, so starting one after another would spin until the grace
            # period ended (for ever on an autojump clock). Answer what is queued instead.
            if self._core.stopped or trio.current_effective_deadline() == -math.inf:
                error = UnavailableError("runtime closed before the message was handled")
                while (envelope := slot.mailbox.get_nowait()) is not None:
                    envelope.reply.set(outcome.Error(error))
            if self._maintenance:
                self._maintenance.unpark_all()
            if slot.held:
                pass  # the hold's owner decides what happens next
            elif slot.mailbox:
                self._activate(address, slot)
            else:
                self._drop(address)

    def _drop(self, address: FacetAddress) -> None:
        del self._slots[address]
        if not self._slots:
            self._emptied.unpark_all()

    # -- holds (data operations) ---------------------------------------------------------

    def close_tenant(self, tenant: str) -> None:
        """Refuse every new message of ``tenant`` (``not_found``), and fail those queued behind
        a hold when it ends: its facets are being deleted."""
        self._closed_tenants.add(tenant)

    def reopen_tenant(self, tenant: str) -> None:
        self._closed_tenants.discard(tenant)

    @contextlib.asynccontextmanager
    async def hold(self, address: FacetAddress) -> AsyncIterator[None]:
        """Own ``address``'s store exclusively for the block (its activation is stopped).

        Waits for other holds of the address and for the current activation to finish its
        message and close its store. Cancellation while waiting releases the hold.
        """
        slot = await self._take(address)
        try:
            activation = slot.activation
            if activation is not None:
                # The activation must not take what is queued: it would run against the state
                # being replaced. It finds an empty mailbox, finishes and passivates.
                fresh = self._new_mailbox(address)
                slot.mailbox.move_to(fresh)
                slot.mailbox = fresh
                activation.request_stop()
                while slot.activation is not None:
                    await self._maintenance.park()
            yield
        finally:
            self._release(address, slot)

    async def _take(self, address: FacetAddress) -> _Slot:
        await trio.lowlevel.checkpoint()
        while True:
            slot = self._slots.get(address)
            if slot is None:
                slot = _Slot(self._new_mailbox(address))
                self._slots[address] = slot
            if not slot.held:
                slot.held = True
                return slot
            await self._maintenance.park()

    def _release(self, address: FacetAddress, slot: _Slot) -> None:
        assert slot.held
        assert self._slots.get(address) is slot
        slot.held = False
        if self._core.stopped:
            error = UnavailableError("runtime closed before the message was handled")
            while (envelope := slot.mailbox.get_nowait()) is not None:
                envelope.reply.set(outcome.Error(error))
        elif slot.mailbox and address.tenant_id in self._closed_tenants:
            # Queued while its tenant is wiped: a call naming a class would re-create the
            # facet after the wipe, for a later tenant of the same name to find.
            gone = NotFoundError(f"tenant {address.tenant_id!r} was deleted")
            while (envelope := slot.mailbox.get_nowait()) is not None:
                envelope.reply.set(outcome.Error(gone))
        elif slot.mailbox and not self._core.registry.exists(address):
            missing = NotFoundError(f"facet {str(address)!r} does not exist (give a class)")
            for envelope in slot.mailbox.remove_if(lambda envelope: envelope.cls is None):
                envelope.reply.set(outcome.Error(missing))
        if slot.activation is None:
            if slot.mailbox:
                self._activate(address, slot)
            else:
                self._drop(address)
        self._maintenance.unpark_all()

    @contextlib.asynccontextmanager
    async def reading(self, address: FacetAddress) -> AsyncIterator[FacetStore]:
        """Lend ``address``'s open store for a read on a writer thread (a snapshot).

        A running activation is pinned and keeps serving; otherwise the store is opened
        directly under a hold (calls queue meanwhile) and closed afterwards.

        Raises:
            NotFoundError: the facet does not exist.
            StorageError: the store cannot be opened.
        """
        await trio.lowlevel.checkpoint()
        while True:
            slot = self._slots.get(address)
            activation = None if slot is None else slot.activation
            if slot is None or not (slot.held or activation is not None):
                break
            if activation is not None and activation.state in _PINNABLE:
                activation.pin()
                try:
                    store = await activation.wait_open()
                    if store is not None:
                        yield store
                        return
                finally:
                    activation.unpin()
                continue  # it stopped before opening: look again
            await self._maintenance.park()  # held, or draining: wait for it to end
        if not self._core.registry.exists(address):
            raise NotFoundError(f"facet {str(address)!r} does not exist")
        async with self.hold(address):
            if not self._core.registry.exists(address):  # deleted while we waited
                raise NotFoundError(f"facet {str(address)!r} does not exist")
            registry, workers = self._core.registry, self._core.workers
            store = await workers.call(partial(registry.open, address))
            try:
                yield store
            finally:
                # A store must never be left open. Bounded per STYLE §6.5; the close is a
                # writer-thread job that cannot be abandoned, so the bound only ever applies
                # to a close that has not started.
                with trio.move_on_after(CLEANUP_SECONDS, shield=True):
                    await workers.call(partial(registry.close, store, address))

    def is_active(self, address: FacetAddress) -> bool:
        """Whether the facet has a slot: an activation, queued envelopes or a hold."""
        return address in self._slots

    def live_class(self, address: FacetAddress) -> str | None:
        """The class a running activation of ``address`` is bound to (None: not running)."""
        slot = self._slots.get(address)
        activation = None if slot is None else slot.activation
        return None if activation is None else activation.bound_class

    def has_tenant(self, tenant: str) -> bool:
        """Whether any facet of ``tenant`` has a slot (a linear scan: operators only)."""
        return any(address.tenant_id == tenant for address in self._slots)

    async def wait_empty(self) -> None:
        """Return once no facet has an activation or a queued envelope."""
        while self._slots:
            await self._emptied.park()

    def running_activation(self, address: FacetAddress) -> Activation | None:
        """The activation of ``address`` if it runs (its store is open), else None."""
        slot = self._slots.get(address)
        activation = None if slot is None else slot.activation
        if activation is None or activation.state is not ActivationState.RUNNING:
            return None
        return activation

    def mailbox_of(self, address: FacetAddress) -> Mailbox | None:
        slot = self._slots.get(address)
        return None if slot is None else slot.mailbox

    def mailbox_load(self) -> tuple[float | None, int]:
        """(when the oldest envelope queued in any mailbox arrived, in trio time or None;
        how many mailboxes are full): a scan of the slots, for scrapes and readiness only."""
        oldest = None
        full = 0
        for slot in self._slots.values():
            mailbox = slot.mailbox
            arrived = mailbox.oldest_enqueued_at()
            if arrived is not None and (oldest is None or arrived < oldest):
                oldest = arrived
            full += mailbox.is_full()
        return oldest, full

    def activations(self) -> list[Activation]:
        return [slot.activation for slot in self._slots.values() if slot.activation is not None]

    def queued_envelopes(self) -> int:
        return sum(len(slot.mailbox) for slot in self._slots.values())

    def slot_count(self) -> int:
        return len(self._slots)
