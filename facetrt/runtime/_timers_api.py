"""Timers: the durable, named timers facet code uses as ``self.timers`` (SPEC §3).

Changes are writes of the running message: they land in its layer (see ``_layers.py``), are
seen by its own reads at once, commit atomically with its storage writes, and vanish if it
raises (or if the ``storage.transaction()`` block holding them raises). A due timer is
delivered to ``async def on_timer(self, name, payload, attempt)`` as a message of its own.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

from .._errors import BadRequestError, QuotaExceededError
from .._values import Value, decode_value, encode_value
from ._timer_record import TimerRecord, due_ms_of

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..config import RuntimeConfig
    from ..storage import FacetStore
    from ._layers import Layer
    from ._storage_api import Storage
    from ._timer_state import TimerState

# Year 9999: far enough for any schedule, small enough to stay exact in whole milliseconds.
AT_SECONDS_MAX: Final = 253_402_300_799.0
AFTER_SECONDS_MAX: Final = 100 * 366 * 86_400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Timer:
    """One timer of a facet, as ``self.timers.get`` and ``list`` return it.

    Attributes:
        name: its name, unique within the facet.
        at: when it is (next) due, in seconds since the epoch (whole milliseconds).
        payload: the value given to ``set``, passed to ``on_timer``.
        attempts: deliveries that failed so far (the next delivery is attempt ``attempts + 1``).
        failed: retries are exhausted; it will not be delivered again until set anew.
        error: the last failure (exception type and message), or None.
    """

    name: str
    at: float
    payload: Value
    attempts: int
    failed: bool
    error: str | None


@final
class Timers:
    """``self.timers``: any number of named, durable timers of one facet.

    Each method is synchronous and must run inside a message (a handler, ``on_timer`` or an
    ``on_activate``/``on_deactivate`` hook) of this facet.
    """

    def __init__(
        self,
        *,
        storage: Storage,
        store: FacetStore,
        state: Callable[[], TimerState],
        config: RuntimeConfig,
        wall_clock: Callable[[], float],
        has_handler: bool,
    ) -> None:
        self._storage = storage
        self._store = store
        self._state = state
        self._config = config
        self._wall_clock = wall_clock
        self._has_handler = has_handler

    def set(
        self,
        name: str,
        *,
        at: float | datetime.datetime | None = None,
        after_seconds: float | None = None,
        payload: Value = None,
    ) -> None:
        """Set timer ``name`` (replacing one of that name, failed or not) to fire once.

        Args:
            name: 1 to ``timer_name_bytes_max`` UTF-8 bytes.
            at: when, as seconds since the epoch or a timezone-aware datetime.
            after_seconds: when, as a delay from now (>= 0). Give ``at`` or ``after_seconds``,
                not both; with neither the timer is due at once. A time in the past is due at
                once.
            payload: a msgpack value of at most ``timer_payload_bytes_max`` encoded bytes.

        Raises:
            BadRequestError: a bad name, time or payload.
            QuotaExceededError: the facet already has ``timers_per_facet_max`` timers.
            TypeError: the facet's class has no ``on_timer`` method.
        """
        self._check_name(name)
        if not self._has_handler:
            raise TypeError("this facet's class defines no on_timer method to deliver timers to")
        due_ms = self._due_ms(at, after_seconds)
        encoded = encode_value(
            payload, bytes_max=self._config.timer_payload_bytes_max, what="timer payload"
        )
        top = self._storage._top()
        layers = self._storage.layers()
        state = self._state()
        if state.record(self._store, layers, name) is None:
            self._check_room(state, layers)
        record = TimerRecord(due_ms=due_ms, attempts=0, failed=False, error=None, payload=encoded)
        top.set_timer(name, record)

    def cancel(self, name: str) -> bool:
        """Delete timer ``name``; return whether it existed."""
        self._check_name(name)
        top = self._storage._top()
        existed = self._state().record(self._store, self._storage.layers(), name) is not None
        top.set_timer(name, None)
        return existed

    def get(self, name: str) -> Timer | None:
        """Timer ``name``, or None."""
        self._check_name(name)
        record = self._state().record(self._store, self._storage.layers(), name)
        return None if record is None else _timer(name, record)

    def list(self) -> list[Timer]:
        """Every timer of the facet, by due time then name (failed ones included)."""
        state = self._state()
        layers = self._storage.layers()
        timers = []
        for name in state.visible(layers):
            record = state.record(self._store, layers, name)
            assert record is not None
            timers.append(_timer(name, record))
        timers.sort(key=lambda timer: (timer.at, timer.name))
        return timers

    def _check_name(self, name: object) -> None:
        limit = self._config.timer_name_bytes_max
        if type(name) is not str:
            raise BadRequestError(f"timer name must be str, got {type(name).__name__}")
        try:
            size = len(name.encode())
        except UnicodeEncodeError as exc:
            raise BadRequestError(f"timer name {name!r} is not valid UTF-8: {exc.reason}") from None
        if not 0 < size <= limit:
            raise BadRequestError(f"timer name must be 1 to {limit} UTF-8 bytes, got {size}")

    def _due_ms(self, at: object, after_seconds: object) -> int:
        if at is not None and after_seconds is not None:
            raise BadRequestError("timer: give at or after_seconds, not both")
        now = self._wall_clock()
        if at is None:
            delay = 0.0 if after_seconds is None else _seconds(after_seconds, "after_seconds")
            if not 0 <= delay <= AFTER_SECONDS_MAX:
                raise BadRequestError(
                    f"timer: after_seconds must be 0 to {AFTER_SECONDS_MAX:.0f}, got {delay!r}"
                )
            return due_ms_of(now + delay)
        if isinstance(at, datetime.datetime):
            if at.tzinfo is None:
                raise BadRequestError("timer: at must be a timezone-aware datetime")
            at = at.timestamp()
        seconds = _seconds(at, "at")
        if not 0 <= seconds <= AT_SECONDS_MAX:
            raise BadRequestError(f"timer: at must be 0 to {AT_SECONDS_MAX:.0f}, got {seconds!r}")
        return due_ms_of(seconds)

    def _check_room(self, state: TimerState, layers: Sequence[Layer]) -> None:
        limit = self._config.timers_per_facet_max
        # Cheap bound first: each pending write adds at most one timer.
        if len(state.durable) + state.pending_writes(layers) < limit:
            return
        if state.count(layers) >= limit:
            raise QuotaExceededError(f"facet already has {limit} timers (timers_per_facet_max)")


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequestError(f"timer: {what} must be a finite number, got {value!r}")
    return float(value)


def _timer(name: str, record: TimerRecord) -> Timer:
    return Timer(
        name=name,
        at=record.due_ms / 1000,
        payload=decode_value(record.payload),
        attempts=record.attempts,
        failed=record.failed,
        error=record.error,
    )
