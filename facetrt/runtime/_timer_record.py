"""TimerRecord: one durable timer as stored in a facet's ``timers`` db, and its encoding.

Record layout (msgpack array, value of key = timer name in UTF-8)::

    [due_ms, attempts, failed, error, payload]

    due_ms    int   when it is due, in whole milliseconds since the epoch (the wall clock)
    attempts  int   deliveries that failed so far (0 for a new timer)
    failed    bool  retries exhausted: never delivered again, kept until set or cancelled
    error     str | None   the last failure ("Type: message", truncated), for inspection
    payload   bytes the msgpack-encoded payload given to ``set`` (decoded per delivery, so a
                    handler never aliases the stored value)

Whole milliseconds keep due times exact across the store, the node's index and comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

import msgpack

ERROR_CHARS_MAX: Final = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerRecord:
    due_ms: int
    attempts: int
    failed: bool
    error: str | None
    payload: bytes

    def retried(
        self, error: str, *, now_ms: int, retries_max: int, first_delay_seconds: float
    ) -> TimerRecord:
        """This timer after a failed delivery: due again after the backoff, or failed.

        Attempt ``n`` (1-based) failing schedules retry ``n`` after
        ``first_delay_seconds * 2 ** (n - 1)``; after ``retries_max`` retries it is failed.
        """
        attempts = self.attempts + 1
        error = error[:ERROR_CHARS_MAX]
        if attempts > retries_max:
            return replace(self, attempts=attempts, failed=True, error=error)
        delay_ms = math.ceil(first_delay_seconds * 1000 * 2 ** (attempts - 1))
        return replace(self, due_ms=now_ms + delay_ms, attempts=attempts, error=error)


def encode_record(record: TimerRecord) -> bytes:
    _check(record)
    data: bytes = msgpack.packb(
        [record.due_ms, record.attempts, record.failed, record.error, record.payload],
        use_bin_type=True,
    )
    return data


def decode_record(raw: bytes) -> TimerRecord:
    due_ms, attempts, failed, error, payload = msgpack.unpackb(raw, raw=False)
    record = TimerRecord(
        due_ms=due_ms, attempts=attempts, failed=failed, error=error, payload=payload
    )
    _check(record)
    return record


def parse_record(raw: bytes) -> TimerRecord | None:
    """``raw`` as a record if it has the record's shape, else None; never raises.

    For stores that arrive from outside (an import, a backup): :func:`decode_record` asserts
    the shape, because a bad record in a live store is a broken invariant; one in an operator's
    file is bad input, refused before the store is installed.
    """
    try:
        fields = msgpack.unpackb(raw, raw=False)
    except Exception:  # noqa: BLE001 - msgpack raises many types; any failure means malformed
        return None
    if not isinstance(fields, list) or len(fields) != 5:
        return None
    due_ms, attempts, failed, error, payload = fields
    if not (
        type(due_ms) is int
        and 0 <= due_ms < 2**63
        and type(attempts) is int
        and attempts >= 0
        and type(failed) is bool
        and (error is None or type(error) is str)
        and type(payload) is bytes
    ):
        return None
    return TimerRecord(
        due_ms=due_ms, attempts=attempts, failed=failed, error=error, payload=payload
    )


def _check(record: TimerRecord) -> None:
    """The record's shape, checked before it is written and after it is read (STYLE §8)."""
    assert type(record.due_ms) is int, record.due_ms
    assert record.due_ms >= 0, record.due_ms
    assert type(record.attempts) is int, record.attempts
    assert record.attempts >= 0, record.attempts
    assert type(record.failed) is bool, record.failed
    assert record.error is None or type(record.error) is str, record.error
    assert type(record.payload) is bytes, type(record.payload)


def wall_ms(seconds: float) -> int:
    """Whole milliseconds at or before ``seconds`` (a wall-clock reading)."""
    return math.floor(seconds * 1000)


def due_ms_of(seconds: float) -> int:
    """Whole milliseconds at or after ``seconds``: a timer never fires before its time."""
    return math.ceil(seconds * 1000)
