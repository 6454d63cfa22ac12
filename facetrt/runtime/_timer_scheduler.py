"""TimerScheduler: the one task that wakes facets whose timers are due.

It reads the node's :class:`~facetrt.storage.TimerIndex` (earliest hint first), sends each due
facet one *wake* (an internal envelope through the facet's mailbox, so timers run one at a time
with its other messages), and sleeps until the next hint or until told of an earlier one. A
wake runs every due timer of the facet (up to ``timer_fires_per_wake_max``); the facet commits
their effects and settles its hint before the wake's reply comes back here.

Bounds: at most ``timer_wakes_in_flight_max`` facets are being woken at once; a facet whose
wake failed (mailbox full, class not registered, ...) or found nothing due (a spurious hint,
or a wall clock that went back) is *deferred*: not woken again for a while. Deferred facets
share that bound with the ones in flight. To keep refills cheap, after filling up the scheduler
waits until half the wakes in flight are answered (each refill rescans the entries it skips).

Storage failures: a read of the index that fails (its environment failed and is being, or
could not be, reopened: see ``TimerIndex``) is logged and retried after
``INDEX_RETRY_SECONDS``, with a repair of the index on a writer thread meanwhile; it never
ends the loop, which would take the node down with it. Wakes already in flight go on.

Clocks: due times are wall-clock milliseconds (``RuntimeCore.wall_clock``, persisted); sleeping
uses trio's clock, converted at each refill, so an injected wall clock derived from trio's
(tests with the autojump clock) moves both together. Sleeps are capped at
``SLEEP_SECONDS_MAX`` while a hint exists, so a stepped wall clock is noticed.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Final, final

import outcome
import trio

from .._errors import FacetrtError, NotFoundError, StorageError, UnavailableError
from ._timer_record import wall_ms

if TYPE_CHECKING:
    from .._ids import FacetAddress
    from .._values import Value
    from ..storage import TimerIndex
    from ._core import RuntimeCore

logger = logging.getLogger(__name__)

FIRE_TIMERS: Final = "fire_timers"  # the method of an internal wake envelope
SLEEP_SECONDS_MAX: Final = 60.0
EMPTY_WAKE_DEFER_SECONDS: Final = 1.0
FAILED_WAKE_DEFER_SECONDS: Final = 10.0
INDEX_RETRY_SECONDS: Final = 1.0
_IN_FLIGHT: Final = math.inf


@final
class TimerScheduler:
    """Wakes facets with due timers; run with ``nursery.start(scheduler.run)``."""

    def __init__(self, *, core: RuntimeCore, index: TimerIndex) -> None:
        self._core = core
        self._index = index
        self._wakes_max = core.config.timer_wakes_in_flight_max
        # address -> trio time it may be woken again; _IN_FLIGHT while its wake runs.
        self._busy: dict[FacetAddress, float] = {}
        self._in_flight = 0
        self._starved = False  # the last refill stopped at the bound
        self._target_ms: int | None = None  # the hint the loop sleeps until
        # Where the last refill that filled up stopped in the index: the next one starts
        # after it (round robin), or facets whose wakes keep failing, whose hints stay the
        # earliest, would take every wake again once deferred and starve the others.
        self._position: bytes | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()
        self._repairing = False  # an index repair job is on a writer thread

    def notify(self, due_ms: int) -> None:
        """A facet's hint moved to ``due_ms``: wake the loop if it sleeps for a later one.

        Never checkpoints.
        """
        if not self._starved and (self._target_ms is None or due_ms < self._target_ms):
            self._lot.unpark_all()

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` or the runtime closes."""
        with self._scope:
            task_status.started()
            while not self._core.closing:
                deadline = self._refill()
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    await self._lot.park()

    def _refill(self) -> float | None:
        """Wake what is due; return the trio time of the next thing to do (None: wait)."""
        now = trio.current_time()
        for address, ready in list(self._busy.items()):
            if ready <= now:
                del self._busy[address]
        wall_now = self._core.wall_clock()
        room = self._wakes_max - len(self._busy)
        due: list[FacetAddress] = []
        next_ms: int | None = None
        if room > 0:
            try:
                due, self._position, next_ms = self._index.due_after(
                    wall_ms(wall_now), after=self._position, skip=self._busy, limit=room
                )
            except StorageError as exc:
                self._index_failed(exc)
                return now + INDEX_RETRY_SECONDS
        for address in due:
            self._wake(address)
        self._starved = len(self._busy) >= self._wakes_max
        self._target_ms = next_ms
        deadlines = [ready for ready in self._busy.values() if ready != _IN_FLIGHT]
        if next_ms is not None:
            # One millisecond late on purpose: a hint is whole milliseconds rounded up, and
            # waking a hair early (float rounding) would find nothing due.
            delay = (next_ms + 1) / 1000 - wall_now
            deadlines.append(now + min(max(delay, 0.0), SLEEP_SECONDS_MAX))
        return min(deadlines, default=None)

    def _index_failed(self, error: StorageError) -> None:
        """The index could not be read: log, and have a writer thread reopen it if needed."""
        logger.error("reading the timer index failed; retrying: %s", error.message)
        if self._repairing:
            return
        self._repairing = True
        self._core.workers.submit(self._index.repair, self._repaired)

    def _repaired(self, result: outcome.Outcome[None]) -> None:
        self._repairing = False
        try:
            result.unwrap()
        except StorageError as exc:  # anything else is a bug: let it crash
            logger.error("the timer index could not be reopened yet: %s", exc.message)

    def _wake(self, address: FacetAddress) -> None:
        core = self._core
        try:
            core.submit(
                address,
                FIRE_TIMERS,
                (),
                {},
                cls=None,
                idempotency_key=None,
                chain=(),
                callback=partial(self._woken, address),
                internal=True,
            )
        except NotFoundError:
            # No store: the facet was deleted. Its hint goes, checked under the index's lock.
            self._mark_in_flight(address)
            path = core.registry.path_of(address)
            core.workers.submit(
                partial(self._index.forget_if_missing, address, path),
                partial(self._forgotten, address),
            )
        except UnavailableError:
            return  # closing: the loop ends
        except FacetrtError as exc:  # overloaded, or refused otherwise: try again later
            logger.info("waking %s for its timers was refused: %s", address, exc.message)
            self._busy[address] = trio.current_time() + FAILED_WAKE_DEFER_SECONDS
        else:
            self._mark_in_flight(address)
            core.counters.timer_wakes += 1

    def _mark_in_flight(self, address: FacetAddress) -> None:
        self._busy[address] = _IN_FLIGHT
        self._in_flight += 1

    def _done(self, address: FacetAddress, defer_seconds: float, *, poke: bool) -> None:
        self._in_flight -= 1
        if defer_seconds > 0:
            self._busy[address] = trio.current_time() + defer_seconds
        else:
            del self._busy[address]
        if poke or (self._starved and self._in_flight <= self._wakes_max // 2):
            self._starved = False
            self._lot.unpark_all()

    def _woken(self, address: FacetAddress, result: outcome.Outcome[Value]) -> None:
        """The wake's reply (on the loop thread, after its commit and hint are durable)."""
        if isinstance(result, outcome.Error):
            error = result.error
            message = error.message if isinstance(error, FacetrtError) else repr(error)
            logger.warning("waking %s for its timers failed: %s", address, message)
            self._done(address, FAILED_WAKE_DEFER_SECONDS, poke=True)
            return
        fired = result.unwrap()
        assert isinstance(fired, int)
        if fired == 0:
            # A spurious hint (settled by that wake), or a wall clock behind the hint.
            self._done(address, EMPTY_WAKE_DEFER_SECONDS, poke=True)
        else:
            # At the per-wake limit more may be due: look again at once.
            limit = self._core.config.timer_fires_per_wake_max
            self._done(address, 0.0, poke=fired >= limit)

    def _forgotten(self, address: FacetAddress, result: outcome.Outcome[bool]) -> None:
        if isinstance(result, outcome.Error):
            logger.warning("removing the timer hint of deleted %s failed: %r", address, result)
            self._done(address, FAILED_WAKE_DEFER_SECONDS, poke=True)
            return
        self._core.counters.timer_hints_removed += int(result.unwrap())
        self._done(address, 0.0, poke=False)
