"""The history of one run: every attempt of every operation, the faults, in order.

Events are numbered in the order they happened (one loop thread: a total order that agrees
with real time), which is what the checker's real-time rule compares. The trace (events with
their trio times) is what two runs of one seed must reproduce exactly: its digest is the
run's fingerprint.

Outcomes, from the caller's side:

- ``ok``: the reply came; the operation was applied exactly once (or, for a repeat of a keyed
  operation, earlier) and the result describes that application.
- ``failed``: an error reply that guarantees nothing was applied (``handler_error``,
  ``internal`` for a failed commit, ``overloaded``, ``unavailable`` from the runtime...).
- ``unknown``: no reply the caller can trust: cancelled by the caller, a ``timeout``, a
  dropped connection, or a crash of the node before the reply left it.

Timer deliveries are events too: every ``on_timer`` attempt (failed ones included, which leave
nothing on disk) is recorded when it begins, with the wall time it saw.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from facetrt import Value

    from .plan import DataOpSpec, OperationSpec

UNKNOWN_CODES = frozenset({"timeout"})  # SPEC §4: its writes may or may not have committed


class Status(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(slots=True, kw_only=True)
class Attempt:
    number: int
    path: str  # "embedded" or "protocol"
    invoked: int  # event number
    completed: int | None = None
    status: Status | None = None  # None while in flight
    code: str | None = None  # the error code of a failed or unknown attempt
    result: Value = None
    reason: str = ""  # why an outcome is unknown


@dataclass(slots=True, kw_only=True)
class Operation:
    spec: OperationSpec
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return self.spec.tag

    def first_invoked(self) -> int:
        return min(attempt.invoked for attempt in self.attempts)

    def first_ok(self) -> Attempt | None:
        done = [attempt for attempt in self.attempts if attempt.status is Status.OK]
        return min(done, key=lambda attempt: attempt.completed or 0) if done else None

    def all_failed(self) -> bool:
        return all(attempt.status is Status.FAILED for attempt in self.attempts)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerAttempt:
    """One ``on_timer`` call as the facet saw it begin."""

    facet: str
    name: str
    payload: Value
    attempt: int
    wall: float  # the runtime's wall clock (seconds since the epoch)
    event: int


@dataclass(slots=True, kw_only=True)
class DataOp:
    """One data operation as the data lane ran it. ``status``: ``ok`` (it completed: its
    change took effect), ``failed`` with a code that guarantees nothing changed
    (``not_found``, ``conflict``), or ``unknown`` (another error, or a crash or a restart
    cancelled it: the change may or may not have taken effect). ``entries``: the log of the
    copy it read (export, backup), when it completed."""

    spec: DataOpSpec
    started: int  # event number
    ended: int | None = None  # None: in flight when the node went down
    status: Status | None = None
    code: str | None = None
    entries: list[list[Value]] | None = None
    copied: int | None = None  # a transfer: the event once its export was read
    copied_from: DataOp | None = None  # a restore: the backup it installs

    def may_have_changed(self) -> bool:
        return self.status is not Status.FAILED


@final
class History:
    def __init__(self) -> None:
        self.operations: dict[str, Operation] = {}
        self.faults: Counter[str] = Counter()
        self.trace: list[list[Value]] = []
        self.timer_attempts: list[TimerAttempt] = []
        self.data_ops: list[DataOp] = []
        self._events = 0
        self._in_flight: dict[int, tuple[OperationSpec, Attempt]] = {}

    def _event(self, *fields: Value) -> int:
        self._events += 1
        self.trace.append([self._events, round(trio.current_time(), 9), *fields])
        return self._events

    def invoke(self, spec: OperationSpec, path: str) -> Attempt:
        operation = self.operations.get(spec.tag)
        if operation is None:
            operation = self.operations[spec.tag] = Operation(spec=spec)
        number = len(operation.attempts)
        invoked = self._event("invoke", spec.tag, number, path)
        attempt = Attempt(number=number, path=path, invoked=invoked)
        operation.attempts.append(attempt)
        self._in_flight[id(attempt)] = (spec, attempt)
        return attempt

    def ok(self, spec: OperationSpec, attempt: Attempt, result: Value) -> None:
        self._complete(spec, attempt, Status.OK, None, result, "")

    def failed(self, spec: OperationSpec, attempt: Attempt, code: str) -> None:
        if code in UNKNOWN_CODES:
            if attempt.status is None:
                self.fault("deadline_expired")
            self._complete(spec, attempt, Status.UNKNOWN, code, None, code)
        else:
            self._complete(spec, attempt, Status.FAILED, code, None, "")

    def unknown(self, spec: OperationSpec, attempt: Attempt, reason: str) -> None:
        self._complete(spec, attempt, Status.UNKNOWN, None, None, reason)

    def _complete(
        self,
        spec: OperationSpec,
        attempt: Attempt,
        status: Status,
        code: str | None,
        result: Value,
        reason: str,
    ) -> None:
        if attempt.status is not None:
            return  # already settled: a crash made it unknown; what came later never left
        del self._in_flight[id(attempt)]
        attempt.status, attempt.code, attempt.result, attempt.reason = status, code, result, reason
        attempt.completed = self._event(
            "done", spec.tag, attempt.number, status.value, code, result, reason
        )

    def data_started(self, spec: DataOpSpec) -> DataOp:
        started = self._event("data", spec.tag, spec.kind, spec.facet, spec.source)
        operation = DataOp(spec=spec, started=started)
        self.data_ops.append(operation)
        return operation

    def data_copied(self, operation: DataOp) -> int:
        return self._event("data copied", operation.spec.tag)

    def data_ended(
        self,
        operation: DataOp,
        status: Status,
        code: str | None = None,
        entries: list[list[Value]] | None = None,
    ) -> None:
        if operation.status is not None:
            return
        operation.status, operation.code = status, code
        if entries is not None:
            operation.entries = entries
        operation.ended = self._event(
            "data done", operation.spec.tag, status.value, code, len(entries or ())
        )

    def timer_attempt(
        self, facet: str, name: str, payload: Value, attempt: int, wall: float
    ) -> None:
        instance = payload.get("i") if isinstance(payload, dict) else None
        event = self._event("timer", facet, name, instance, attempt)
        self.timer_attempts.append(
            TimerAttempt(
                facet=facet, name=name, payload=payload, attempt=attempt, wall=wall, event=event
            )
        )

    def crash(self, kind: str = "crash_after_commit") -> None:
        """The node died: no reply of an attempt in flight ever reaches its caller."""
        self.fault(kind)
        for spec, attempt in list(self._in_flight.values()):
            self.unknown(spec, attempt, "crash")
        for operation in self.data_ops:
            if operation.status is None:  # whatever it did, it did before the crash
                operation.status, operation.code = Status.UNKNOWN, "crash"
                operation.ended = self._events

    def note(self, kind: str, detail: Value) -> None:
        """A trace event that is not a fault (a new runtime lifetime, a final state)."""
        self._event("note", kind, detail)

    def fault(self, kind: str, detail: Value = None) -> None:
        self.faults[kind] += 1
        self._event("fault", kind, detail)

    def digest(self) -> str:
        text = json.dumps(self.trace, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
