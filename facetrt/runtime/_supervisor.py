"""Supervisor: bounds open activations at ``open_facets_max`` and evicts idle ones (LRU).

An activation takes a permit before it opens its store and gives it back after the store is
closed. When none is free, the least recently idle activation is asked to passivate, or the
next one to become idle is; a new activation waits at most ``activation_wait_seconds_max``
for a permit and is then refused with ``overloaded`` (facets that call each other could
otherwise wait forever).

Idle passivation is the supervisor's too: one sweeper task asks activations idle for
``idle_timeout_seconds`` to passivate. The idle set is ordered by the time each activation
became idle, and the timeout is the same for all, so the sweeper looks at the oldest timed
entries only and sleeps until the first is due. An activation going idle therefore costs an
ordered dict insert and no timer of its own: a cancel scope with a deadline per idle
transition cost ~6 us, paid on every call of a facet called one call at a time. An activation
idle with a commit in flight is in the set untimed (evictable, never timed out): its idle time
starts when it marks itself idle again after the commit.
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
    def __init__(
        self, open_facets_max: int, *, wait_seconds_max: float, idle_timeout_seconds: float
    ) -> None:
        self._open_max = open_facets_max
        self._wait_seconds_max = wait_seconds_max
        self._idle_timeout = idle_timeout_seconds
        self._open = 0
        self._stopping = 0
        # Activation -> trio time it became idle (None: a commit is in flight), oldest first.
        self._idle: OrderedDict[FacetAddress, tuple[Activation, float | None]] = OrderedDict()
        self._lot = trio.lowlevel.ParkingLot()
        self._sweeper_lot = trio.lowlevel.ParkingLot()
        self._sweeper_parked = False
        self._sweeper_scope = trio.CancelScope()

    @property
    def open_count(self) -> int:
        return self._open

    async def acquire(self) -> None:
        """Take an open permit, evicting the least recently used idle activation if needed.

        Waits at most ``wait_seconds_max`` for one (a burst of new facets queues briefly while
        busy ones finish); past that the activation is refused, since facets waiting on each
        other could otherwise wait forever.

        Raises:
            OverloadedError: no permit came free in time.
        """
        # Checkpoint first: between the final check and the increment below there must be
        # no await, or activations starting together would all pass the check.
        await trio.lowlevel.checkpoint()
        with trio.move_on_after(self._wait_seconds_max) as waited:
            while self._open >= self._open_max:
                waiting = len(self._lot) + 1  # the parked ones and this one
                if self._stopping < waiting and self._idle:
                    _, (victim, _) = self._idle.popitem(last=False)
                    self._stopping += 1
                    victim.request_stop(evicted=True)
                await self._lot.park()
            self._open += 1
        if waited.cancelled_caught:
            raise OverloadedError(
                f"node has {self._open_max} open facets and none became idle within "
                f"{self._wait_seconds_max} s"
            )

    def release(self, *, evicted: bool) -> None:
        self._open -= 1
        if evicted:
            self._stopping -= 1
        self._lot.unpark()

    def mark_idle(self, activation: Activation, *, committing: bool = False) -> None:
        if len(self._lot) > self._stopping:
            # More waiters than evictions under way: this one is now the cheapest to evict.
            self._idle.pop(activation.address, None)
            self._stopping += 1
            activation.request_stop(evicted=True)
            return
        idle = self._idle
        address = activation.address
        idle[address] = (activation, None if committing else trio.current_time())
        idle.move_to_end(address)
        if self._sweeper_parked and not committing:
            self._sweeper_lot.unpark_all()

    def mark_busy(self, activation: Activation) -> None:
        self._idle.pop(activation.address, None)

    def idle_count(self) -> int:
        return len(self._idle)

    def waiting_count(self) -> int:
        """Activations waiting for an open permit (the node is at ``open_facets_max``)."""
        return len(self._lot)

    async def sweep_idle(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ask activations idle for ``idle_timeout_seconds`` to passivate, until :meth:`stop`."""
        idle = self._idle
        timeout = self._idle_timeout
        with self._sweeper_scope:
            task_status.started()
            while True:
                now = trio.current_time()
                expired: list[Activation] = []
                due: float | None = None
                for activation, since in idle.values():
                    if since is None:
                        continue  # a commit in flight: not timed yet
                    if since + timeout > now:
                        due = since + timeout  # the oldest timed entry not due: wait for it
                        break
                    expired.append(activation)
                for activation in expired:
                    idle.pop(activation.address, None)
                    activation.request_stop()
                if due is not None:
                    # An entry refreshed meanwhile moved to the end: waking early only loops.
                    await trio.sleep_until(due)
                    continue
                self._sweeper_parked = True  # until an activation becomes idle, timed
                try:
                    await self._sweeper_lot.park()
                finally:
                    self._sweeper_parked = False

    def stop(self) -> None:
        """End :meth:`sweep_idle` (the runtime is closing; every activation is being stopped)."""
        self._sweeper_scope.cancel()
