"""The timer guarantees (decision 0007, ``Facet`` and ``Timers`` docstrings), checked per run.

Each facet's log holds its timer history in commit order (``facets.py``): ``tset`` entries
(instance, name, due ms, the ``at`` it asked for, how its deliveries behave), ``tcancel``
entries (with whether the timer existed) and ``fire`` entries (a delivery that succeeded:
instance, attempt, wall time, the instance ``on_timer`` set again if any). Replaying it gives
the reference model: which instance of each name is live after every entry. Held against it:

1. **Replace and cancel are honoured.** A ``fire`` entry delivers the instance live at that
   point of the log: one cancelled, replaced or already delivered is never delivered (the
   delivery would have to commit after the change that removed it). A cancel's result says
   whether the model had the timer (read-your-writes across deliveries and failures).
2. **Effects once.** A successful delivery's writes and the timer's removal commit together:
   each instance has at most one ``fire`` entry, whatever was re-delivered after a crash or a
   failed commit.
3. **Never early.** The due time is the asked time in whole milliseconds rounded up; no
   attempt of ``on_timer`` (failed ones included, as the history saw them begin) starts before
   it, nor attempt ``n`` before the backoff of the ``n - 1`` retries before it
   (``initial * (2**(n-1) - 1)`` later: retry ``k`` is due ``initial * 2**(k-1)`` after the
   wake that ran attempt ``k``).
4. **Retries.** ``on_timer`` raising discards its writes (no ``fire`` entry of a failing
   attempt survives) and is retried: the delivery that succeeds is attempt ``fail_until + 1``
   exactly; no attempt is numbered above ``timer_retries_max + 1`` or after the one that
   succeeded; a timer whose every attempt fails ends *failed*, with ``timer_retries_max + 1``
   attempts and the last attempt's error, and is never delivered again.
5. **At least once, durable, across restarts.** After the final fault-free runtime waited past
   the latest time any timer could still be due, every instance the log leaves live is still
   in the store and failed as in 4; a scheduled one is a timer that never fired, a missing one
   a lost timer. Every acknowledged set is in the log (the general checker's presence rule),
   so an acknowledged set is delivered unless a later logged set or cancel replaced it.
6. **Nothing else.** A timer the model does not have (one set in a message that raised, in a
   rolled-back ``transaction()`` block, or cancelled) neither exists at the end nor was ever
   delivered, even once, even unsuccessfully.
7. **Reads are consistent.** ``self.timers.list()`` in a message (``tlist``) shows exactly the
   instances the model has at the log length it reports, due when they were set to be (or
   later, by the backoff of their failed attempts).

What is not promised and not checked: how late a timer fires while faults go on (a wake that
fails is deferred 10 s, a facet reset re-delivers), or how often a delivery runs in all (at
least once: a handler may run again after a failed commit of its effects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .facets import ROLLED_BACK
from .history import Status

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from facetrt import Value

    from .checker import Entry, FacetState
    from .history import Operation, TimerAttempt

EPSILON_SECONDS = 1e-5  # float rounding of wall times near 1.7e9 s
FAILURE_ERROR = "TimerFailure: failing attempt {attempt} on purpose"


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerRules:
    """What the run's configuration promises about retries, and every attempt observed."""

    retries_max: int = 6
    retry_seconds_initial: float = 2.0
    attempts: Sequence[TimerAttempt] = ()

    @property
    def attempts_max(self) -> int:
        return self.retries_max + 1

    def earliest(self, at: float, attempt: int) -> float:
        """The earliest wall time attempt ``attempt`` of a timer asked for ``at`` may begin."""
        return at + self.retry_seconds_initial * float(2 ** (attempt - 1) - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerRow:
    """One timer as ``self.timers.list()`` showed it."""

    name: str
    instance: str
    due_ms: int
    attempts: int
    failed: bool
    error: str | None

    @classmethod
    def parse(cls, raw: Value) -> TimerRow:
        assert isinstance(raw, list), raw
        name, instance, due_ms, attempts, failed, error = raw
        assert isinstance(name, str)
        assert isinstance(instance, str)
        assert isinstance(due_ms, int)
        assert isinstance(attempts, int)
        assert isinstance(failed, bool)
        assert error is None or isinstance(error, str)
        return cls(
            name=name,
            instance=instance,
            due_ms=due_ms,
            attempts=attempts,
            failed=failed,
            error=error,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Instance:
    id: str
    due_ms: int
    at: float
    fail_until: int
    rearms: int


@dataclass(slots=True)
class TimerCounts:
    """What one run's timers did (figures for ``scripts/sim_run.py``)."""

    delivered: int = 0  # fire entries
    failed_for_good: int = 0  # timers left failed at the end, as their payload required
    cancelled: int = 0  # cancels that removed a timer
    replaced: int = 0  # sets that replaced a live timer
    rearmed: int = 0  # timers that on_timer set again
    attempts: int = 0  # on_timer calls observed, failed ones and re-deliveries included
    attempts_failed: int = 0
    reads: int = 0  # tlist replies checked


def check_timers(
    operations: Mapping[str, Operation],
    states: Mapping[str, FacetState],
    rules: TimerRules,
) -> tuple[list[str], TimerCounts]:
    """Every violation of the timer rules above, and what the timers did."""
    counts = TimerCounts()
    violations: list[str] = []
    reads = _reads(operations)
    for facet, state in states.items():
        violations += _replay(facet, state, reads.get(facet, {}), rules, counts)
    violations += _check_attempts(operations, rules, counts)
    return violations, counts


def _reads(operations: Mapping[str, Operation]) -> dict[str, dict[int, list[tuple[str, Value]]]]:
    """facet -> log length -> (tag, rows) of each ``tlist`` reply at that length."""
    found: dict[str, dict[int, list[tuple[str, Value]]]] = {}
    for operation in operations.values():
        if operation.spec.kind != "tlist":
            continue
        for attempt in operation.attempts:
            result = attempt.result
            if attempt.status is not Status.OK:
                continue
            if not (isinstance(result, list) and len(result) == 2 and type(result[1]) is int):
                continue  # malformed: the general checker reports it
            lengths = found.setdefault(operation.spec.facet, {})
            lengths.setdefault(result[1], []).append((operation.tag, result[0]))
    return found


def _replay(
    facet: str,
    state: FacetState,
    reads: dict[int, list[tuple[str, Value]]],
    rules: TimerRules,
    counts: TimerCounts,
) -> list[str]:
    violations: list[str] = []
    live: dict[str, _Instance] = {}
    for index, entry in enumerate(state.log):
        violations += _check_reads(facet, index, reads, live, rules, counts)
        where = f"{facet}[{index}]"
        if entry.kind == "tset":
            instance = _set_instance(entry)
            if instance is None:
                violations.append(f"{where}: malformed timer set {entry}")
                continue
            assert isinstance(entry.first, str)
            if instance.due_ms != math.ceil(instance.at * 1000):
                violations.append(
                    f"{where}: timer {entry.first} of {entry.tag} asked for {instance.at} s is "
                    f"due at {instance.due_ms} ms, not that time rounded up to a millisecond"
                )
            counts.replaced += entry.first in live
            live[entry.first] = instance
        elif entry.kind == "tcancel":
            assert isinstance(entry.first, str)
            existed = entry.first in live
            if entry.second is not existed:
                violations.append(
                    f"{where}: cancel {entry.tag} of timer {entry.first} says it existed: "
                    f"{entry.second!r}, but the log has it {'live' if existed else 'absent'}"
                )
            counts.cancelled += existed
            live.pop(entry.first, None)
        elif entry.kind == "fire":
            counts.delivered += 1
            violations += _fire(where, entry, live, rules, counts)
    violations += _check_reads(facet, len(state.log), reads, live, rules, counts)
    for length in reads:
        if length > len(state.log):
            violations.append(f"{facet}: a tlist read at length {length}, beyond the log")
    final = {row.name: row for row in state.timers}
    violations += _compare(f"{facet}: at the end", final, live, rules, final=True)
    counts.failed_for_good += sum(row.failed for row in state.timers)
    return violations


def _check_reads(
    facet: str,
    length: int,
    reads: dict[int, list[tuple[str, Value]]],
    live: Mapping[str, _Instance],
    rules: TimerRules,
    counts: TimerCounts,
) -> list[str]:
    """The ``tlist`` replies read at log length ``length``, against the model there."""
    violations = []
    for tag, raw in reads.get(length, []):
        counts.reads += 1
        what = f"{facet}: tlist {tag} at length {length}"
        if not isinstance(raw, list):
            violations.append(f"{what}: malformed timer list {raw!r}")
            continue
        rows = {row.name: row for row in map(TimerRow.parse, raw)}
        violations += _compare(what, rows, live, rules)
    return violations


def _set_instance(entry: Entry) -> _Instance | None:
    second = entry.second
    if not (isinstance(second, list) and len(second) == 4):
        return None
    due_ms, at, fail_until, rearms = second
    if not (
        type(due_ms) is int
        and isinstance(at, float)
        and type(fail_until) is int
        and type(rearms) is int
    ):
        return None
    return _Instance(id=entry.tag, due_ms=due_ms, at=at, fail_until=fail_until, rearms=rearms)


def _fire(
    where: str,
    entry: Entry,
    live: dict[str, _Instance],
    rules: TimerRules,
    counts: TimerCounts,
) -> list[str]:
    name, second = entry.first, entry.second
    assert isinstance(name, str)
    if not (isinstance(second, list) and len(second) == 3):
        return [f"{where}: malformed delivery {entry}"]
    attempt, wall, rearm = second
    assert type(attempt) is int
    assert isinstance(wall, float)
    current = live.get(name)
    if current is None or current.id != entry.tag:
        have = "no such timer" if current is None else f"instance {current.id}"
        return [
            f"{where}: timer {name} instance {entry.tag} was delivered (attempt {attempt}) "
            f"where the log has {have}: cancelled, replaced or delivered before"
        ]
    violations = []
    del live[name]
    if current.fail_until >= rules.attempts_max:
        violations.append(
            f"{where}: timer {name} instance {entry.tag} was delivered at attempt {attempt}, "
            f"though every attempt fails and only {rules.attempts_max} are allowed"
        )
    elif attempt != current.fail_until + 1:
        violations.append(
            f"{where}: timer {name} instance {entry.tag} succeeded at attempt {attempt}; its "
            f"first {current.fail_until} attempts fail, so it must be attempt "
            f"{current.fail_until + 1} (a failed attempt's writes survived, or a count is off)"
        )
    earliest = rules.earliest(current.at, attempt)
    if wall < earliest - EPSILON_SECONDS:
        violations.append(
            f"{where}: timer {name} instance {entry.tag} attempt {attempt} was delivered at "
            f"{wall:.6f}, {earliest - wall:.6f} s before its due time and backoff allow"
        )
    if rearm is not None:
        if not (isinstance(rearm, list) and len(rearm) == 3):
            return [*violations, f"{where}: malformed re-set {rearm!r}"]
        again, due_ms, at = rearm
        assert isinstance(again, str)
        assert type(due_ms) is int
        assert isinstance(at, float)
        if current.rearms < 1 or again != f"{entry.tag}+":
            violations.append(f"{where}: timer {name} was set again as {again} unasked")
        live[name] = _Instance(
            id=again, due_ms=due_ms, at=at, fail_until=0, rearms=current.rearms - 1
        )
        counts.rearmed += 1
    return violations


def _compare(
    what: str,
    rows: Mapping[str, TimerRow],
    live: Mapping[str, _Instance],
    rules: TimerRules,
    *,
    final: bool = False,
) -> list[str]:
    """Timers as a message saw them (or at the end), against the model's live instances."""
    violations = []
    for name in sorted(rows.keys() - live.keys()):
        row = rows[name]
        violations.append(
            f"{what}: timer {name} instance {row.instance} exists, but the log has it "
            "cancelled, delivered or never set"
        )
    for name in sorted(live.keys() - rows.keys()):
        violations.append(
            f"{what}: timer {name} instance {live[name].id} is missing: set, never delivered, "
            "never cancelled (a lost timer)"
        )
    for name in sorted(live.keys() & rows.keys()):
        instance, row = live[name], rows[name]
        problem = _row_problem(instance, row, rules)
        if problem is None and final and not row.failed:
            problem = (
                f"still scheduled at the end (due at {row.due_ms} ms, attempts {row.attempts}): "
                "it never fired though every timer had time to"
            )
        if problem is not None:
            violations.append(f"{what}: timer {name} instance {instance.id}: {problem}")
    return violations


def _row_problem(instance: _Instance, row: TimerRow, rules: TimerRules) -> str | None:
    if row.instance != instance.id:
        return f"the store has instance {row.instance}"
    attempts_max = min(instance.fail_until, rules.attempts_max)
    if not 0 <= row.attempts <= attempts_max:
        return f"{row.attempts} failed attempts recorded; at most {attempts_max} can fail"
    if row.failed != (row.attempts == rules.attempts_max):
        return f"failed is {row.failed} after {row.attempts} of {rules.attempts_max} attempts"
    expected_error = None if not row.attempts else FAILURE_ERROR.format(attempt=row.attempts)
    if row.error != expected_error:
        return f"error {row.error!r}, expected {expected_error!r}"
    due_ms = instance.due_ms
    if not row.attempts and row.due_ms != due_ms:
        return f"due at {row.due_ms} ms, but it was set for {due_ms} ms"
    if row.attempts and not row.failed:
        earliest = rules.earliest(instance.at, row.attempts + 1)
        if row.due_ms < earliest * 1000 - EPSILON_SECONDS * 1000:
            return (
                f"retry {row.attempts} due at {row.due_ms} ms, before the backoff allows "
                f"({earliest * 1000:.3f} ms)"
            )
    return None


def _check_attempts(
    operations: Mapping[str, Operation], rules: TimerRules, counts: TimerCounts
) -> list[str]:
    """Every on_timer call the history saw begin (failed and repeated ones included)."""
    violations = []
    for observed in rules.attempts:
        counts.attempts += 1
        what = (
            f"{observed.facet}: on_timer({observed.name!r}, attempt {observed.attempt}) at "
            f"{observed.wall:.6f} (event {observed.event})"
        )
        payload = observed.payload
        if not isinstance(payload, dict):
            violations.append(f"{what}: malformed payload {payload!r}")
            continue
        instance, at, fail_until = payload.get("i"), payload.get("at"), payload.get("f")
        if not (isinstance(instance, str) and isinstance(at, float) and type(fail_until) is int):
            violations.append(f"{what}: malformed payload {payload!r}")
            continue
        counts.attempts_failed += observed.attempt <= fail_until
        if instance == ROLLED_BACK:
            violations.append(f"{what}: a timer set in a rolled-back transaction() block ran")
            continue
        operation = operations.get(instance.rstrip("+"))
        if operation is None:
            violations.append(f"{what}: instance {instance} of a set nobody sent")
            continue
        spec = operation.spec
        if spec.raises:
            violations.append(f"{what}: instance {instance} was set by a message that raised")
        elif (spec.facet, spec.name) != (observed.facet, observed.name):
            violations.append(f"{what}: instance {instance} was set on {spec.facet}/{spec.name}")
        if not 1 <= observed.attempt <= min(fail_until + 1, rules.attempts_max):
            violations.append(
                f"{what}: instance {instance}: an attempt past the last one allowed "
                f"({min(fail_until + 1, rules.attempts_max)}: attempt {fail_until + 1} "
                f"succeeds, {rules.attempts_max} is the last)"
            )
        earliest = rules.earliest(at, observed.attempt)
        if observed.wall < earliest - EPSILON_SECONDS:
            violations.append(
                f"{what}: instance {instance} began {earliest - observed.wall:.6f} s before "
                "its due time and backoff allow"
            )
    return violations
