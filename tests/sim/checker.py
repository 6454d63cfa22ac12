"""The invariants checked after each run, against a reference model built from the facets' logs.

Every write of the simulation's facet appends ``[tag, kind, a, b]`` to the facet's log in the
same message (``facets.py``), so the final log of each facet, read back from disk after a
clean restart, says which operations were applied, how often and in what order. The checker
holds it against what the callers saw (``history.py``):

1. **State**: the facet's counter, registers and their paddings equal a replay of its log (the
   reference model), and the log is dense (no gap, no stray entry).
2. **Acknowledged writes are readable**: an operation with an ``ok`` reply is in the log of its
   facet exactly once (a forward: in both facets).
3. **No message applied twice**: no tag appears twice in one log, whatever the retries,
   repeats with an idempotency key, crashes and reactivations.
4. **Failures apply nothing**: an operation whose every attempt failed with a definite error
   (``handler_error``, ``internal`` after a failed commit, ``overloaded``...) is absent; so
   is every operation whose handler raised on purpose (``fail``, ``tfail``), whatever its
   replies. Unknown outcomes (cancelled, ``timeout``, dropped connection, crash) may be
   either. Only those raise: ``handler_error`` from any other operation is an assertion of
   the facet that failed (it checks, for one, that a timer it set reads back).
5. **Results are true**: each ``ok`` result names the log index of its own entry, with the
   counter value the log implies there; a read's value is the last write of that register
   before the log length it reports, which is at most the final length (what a reply showed
   was durable). Every ``ok`` reply of one keyed operation is the same (idempotency).
6. **Per-facet order** (real time): if an operation was acknowledged before another was sent,
   the second is not before the first in the facet's log. A client's sequential calls are a
   special case; reads take part at the log length they saw.
7. **Turns do not overlap** in one activation (the input gate), as the facet observed;
   ``on_timer`` deliveries take part.
8. **Timers** keep their guarantees: ``timer_checks.py`` (the log's ``tset``, ``tcancel`` and
   ``fire`` entries, the ``on_timer`` attempts the history saw, the timers at the end).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .data_checks import DataChecker, latest_apply
from .facets import LOG_PREFIX, pad_bytes
from .history import Status
from .timer_checks import TimerCounts, TimerRow, TimerRules, check_timers

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from facetrt import Value

    from .history import DataOp, Operation

WRITE_KINDS = {"add": 1, "put": 1, "forward": 2, "tset": 1, "tcancel": 1}  # writes per operation
READ_KINDS = frozenset({"get", "tlist"})
TIMER_ENTRY = "fire"  # a timer's delivery: its tag is the timer's instance, not an operation


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    tag: str
    kind: str
    first: Value
    second: Value
    origin: str = ""  # the facet that wrote it (a copied log holds other facets' entries)


@dataclass(slots=True, kw_only=True)
class FacetState:
    """A facet's state as its ``snapshot`` returned it (empty if it was never created)."""

    log: list[Entry] = field(default_factory=list)
    log_keys: list[str] = field(default_factory=list)
    length: int = 0
    count: int = 0
    registers: dict[str, Value] = field(default_factory=dict)
    pads: dict[str, Value] = field(default_factory=dict)  # register key -> padding length
    timers: list[TimerRow] = field(default_factory=list)

    @classmethod
    def from_snapshot(cls, raw: Mapping[str, Value]) -> FacetState:
        log = raw["log"]
        keys = raw["log_keys"]
        registers = raw["registers"]
        pads = raw["pads"]
        timers = raw["timers"]
        length = raw["next"]
        count = raw["count"]
        assert isinstance(log, list)
        assert isinstance(keys, list)
        assert isinstance(registers, dict)
        assert isinstance(pads, dict)
        assert isinstance(timers, list)
        assert isinstance(length, int)
        assert isinstance(count, int)
        entries = []
        for item in log:
            assert isinstance(item, list), item
            assert len(item) == 5, item
            tag, kind, first, second, origin = item
            assert isinstance(tag, str)
            assert isinstance(kind, str)
            assert isinstance(origin, str)
            entries.append(Entry(tag=tag, kind=kind, first=first, second=second, origin=origin))
        return cls(
            log=entries,
            log_keys=[str(key) for key in keys],
            length=length,
            count=count,
            registers=dict(registers),
            pads=dict(pads),
            timers=[TimerRow.parse(row) for row in timers],
        )


@dataclass(slots=True, kw_only=True)
class CheckResult:
    violations: list[str]
    acknowledged_writes: int
    lost_writes: int
    timers: TimerCounts = field(default_factory=TimerCounts)

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True, slots=True)
class _Point:
    """An operation's place in a facet's order, with when it was sent and acknowledged."""

    position: float  # log index; a read sits at (length it saw) - 0.5
    invoked: int
    acknowledged: int | None
    tag: str


def check(
    operations: Mapping[str, Operation],
    states: Mapping[str, FacetState],
    overlapping_turns: Iterable[str] = (),
    *,
    rules: TimerRules | None = None,
    data_ops: Sequence[DataOp] = (),
) -> CheckResult:
    """Every violation of the invariants above, as readable lines (none: the run passed).
    ``rules``: the run's retry policy and observed ``on_timer`` attempts (default: the
    default policy, no attempts); ``data_ops``: the data operations run (``data_checks``)."""
    data = DataChecker(operations, states, data_ops)
    checker = _Checker(operations, states, data)
    checker.run()
    data.run()
    checker.violations.extend(data.violations)
    checker.violations.extend(f"turns overlapped: {text}" for text in overlapping_turns)
    timer_violations, timer_counts = check_timers(operations, states, rules or TimerRules())
    return CheckResult(
        violations=checker.violations + timer_violations,
        acknowledged_writes=checker.acknowledged_writes,
        lost_writes=checker.lost_writes,
        timers=timer_counts,
    )


class _Checker:
    def __init__(
        self,
        operations: Mapping[str, Operation],
        states: Mapping[str, FacetState],
        data: DataChecker,
    ):
        self.operations = operations
        self.states = states
        self.data = data
        # (facet that wrote it, tag) -> (facet whose log holds it, index) of every copy
        self.locations: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.violations: list[str] = []
        self.acknowledged_writes = 0
        self.lost_writes = 0
        # facet -> tag -> log indexes holding it
        self.positions: dict[str, dict[str, list[int]]] = {}
        # facet -> counter value after each log index
        self.counts: dict[str, list[int]] = {}

    def run(self) -> None:
        for facet, state in self.states.items():
            self._check_state(facet, state)
            self._index(facet, state)
        for operation in self.operations.values():
            self._check_presence(operation)
            self._check_results(operation)
            self._check_codes(operation)
        for facet in self.states:
            self._check_order(facet)

    def _state(self, facet: str | None) -> FacetState:
        return self.states.get(facet or "", FacetState())

    # 1. state = replay of the log ------------------------------------------------------

    def _check_state(self, facet: str, state: FacetState) -> None:
        if state.length != len(state.log):
            self.violations.append(
                f"{facet}: log length {state.length} but {len(state.log)} entries"
            )
        expected_keys = [f"{LOG_PREFIX}{index:08d}" for index in range(len(state.log))]
        if state.log_keys != expected_keys:
            self.violations.append(f"{facet}: log keys are not dense: {state.log_keys[:5]}...")
        count = 0
        registers: dict[str, Value] = {}
        counts = []
        for entry in state.log:
            if entry.kind == "add":
                assert isinstance(entry.first, int)
                count += entry.first
            elif entry.kind == "put":
                assert isinstance(entry.first, str)
                registers[entry.first] = entry.second
            counts.append(count)
        self.counts[facet] = counts
        if state.count != count:
            self.violations.append(f"{facet}: counter is {state.count}, its log adds to {count}")
        if state.registers != registers:
            self.violations.append(
                f"{facet}: registers {state.registers} differ from the log's {registers}"
            )
        pads = {key: pad_bytes(value) for key, value in registers.items() if isinstance(value, int)}
        if state.pads != {key: size for key, size in pads.items() if size}:
            self.violations.append(f"{facet}: paddings {state.pads} differ from the log's {pads}")

    def _index(self, facet: str, state: FacetState) -> None:
        positions: dict[str, list[int]] = {}
        for index, entry in enumerate(state.log):
            if entry.kind == TIMER_ENTRY:
                continue  # a delivery: checked by timer_checks against the model
            origin = entry.origin or facet
            if origin == facet:
                positions.setdefault(entry.tag, []).append(index)
            self.locations.setdefault((origin, entry.tag), []).append((facet, index))
            operation = self.operations.get(entry.tag)
            if operation is None:
                self.violations.append(f"{facet}[{index}]: {entry} of an operation never sent")
            elif not _entry_matches(operation, origin, entry):
                self.violations.append(
                    f"{facet}[{index}]: {entry} does not match {operation.spec.kind} "
                    f"{operation.tag} on {operation.spec.facet} ({_outcomes(operation)})"
                )
        self.positions[facet] = positions

    # 2-4. presence ----------------------------------------------------------------------

    def _check_presence(self, operation: Operation) -> None:
        spec = operation.spec
        if spec.kind in READ_KINDS:
            return
        acknowledged = operation.first_ok() is not None
        if acknowledged:
            self.acknowledged_writes += WRITE_KINDS.get(spec.kind, 0)
        places = [(spec.facet, "applied")]
        if spec.kind == "forward":
            places.append((spec.target or "", "forwarded add applied"))
        for facet, what in places:
            # Copies (clones, imports, restores) carry entries into other facets' logs: one
            # per log at most, wherever they are; a facet that a data operation may have
            # replaced is held to data_checks' rules instead of "every acknowledged write".
            locations = self.locations.get((facet, spec.tag), [])
            found = max(Counter(log for log, _ in locations).values(), default=0)
            here = len(self.positions.get(facet, {}).get(spec.tag, []))
            described = f"{spec.kind} {spec.tag} on {facet} ({_outcomes(operation)})"
            if found > 1:
                self.violations.append(f"{described}: {what} {found} times")
            elif spec.raises and found:
                self.violations.append(f"{described}: its handler raised, yet it was applied")
            elif acknowledged and not here and not spec.raises:
                if not self.data.is_replaced(facet):
                    self.lost_writes += 1
                    self.violations.append(f"{described}: acknowledged, but missing from the log")
            elif found and operation.all_failed() and what == "applied":
                self.violations.append(f"{described}: every attempt failed, yet it was applied")

    def _check_codes(self, operation: Operation) -> None:
        spec = operation.spec
        if spec.raises:
            return
        for attempt in operation.attempts:
            if attempt.code == "handler_error":
                self.violations.append(
                    f"{spec.kind} {spec.tag} on {spec.facet} ({_outcomes(operation)}): its "
                    "handler never raises, yet an attempt failed with handler_error (an "
                    "assertion of the facet failed: see the runtime's log)"
                )
                return

    # 5. results -------------------------------------------------------------------------

    def _check_results(self, operation: Operation) -> None:
        results = [a.result for a in operation.attempts if a.status is Status.OK]
        if not results:
            return
        spec = operation.spec
        described = f"{spec.kind} {spec.tag} on {spec.facet} ({_outcomes(operation)})"
        replaced = self.data.is_replaced(spec.facet) or (
            spec.kind == "forward" and self.data.is_replaced(spec.target or "")
        )
        if replaced:
            # A delete drops the idempotency records with the facet, and a restore or a copy
            # brings in another state's: a repeat may be applied again, with its own reply,
            # and the entry found may be of another attempt than the one that replied.
            if sum(a.status is not Status.FAILED for a in operation.attempts) > 1:
                return
            problems = [self._result_problem(operation, result) for result in results]
            if all(problem is not None for problem in problems):
                self.violations.append(f"{described}: {problems[0]}")
            return
        if any(result != results[0] for result in results[1:]):
            self.violations.append(f"{described}: replies differ: {results}")
        problem = self._result_problem(operation, results[0])
        if problem is not None:
            self.violations.append(f"{described}: {problem}")

    def _result_problem(self, operation: Operation, result: Value) -> str | None:
        spec = operation.spec
        problem = None
        if spec.kind == "add":
            problem = self._add_result(spec.facet, spec.tag, result)
        elif spec.kind == "put":
            problem = self._entry_at(spec.facet, spec.tag, result)[0]
        elif spec.kind == "get":
            if not self.data.replaced_after(spec.facet, operation.first_invoked()):
                problem = self._read_result(spec.facet, spec.key, result)
        elif spec.kind in ("tset", "tcancel"):
            problem = self._timer_result(spec.facet, spec.tag, result)
        elif spec.kind == "tlist":
            # Compared with the model by timer_checks; here only its shape and length.
            if not (isinstance(result, list) and len(result) == 2 and type(result[1]) is int):
                problem = f"malformed timer list result {result!r}"
            elif not 0 <= result[1] <= len(self._state(spec.facet).log):
                problem = f"read at log length {result[1]}, beyond the durable log"
        elif spec.kind == "forward":
            if not (isinstance(result, list) and len(result) == 2):
                problem = f"malformed result {result!r}"
            else:
                problem = self._entry_at(spec.facet, spec.tag, result[0])[0] or self._add_result(
                    spec.target or "", spec.tag, result[1]
                )
        else:
            problem = f"a handler that raises replied {result!r}"
        return problem

    def _entry_at(self, facet: str, tag: str, index: Value) -> tuple[str | None, str | None]:
        """Whether the entry ``tag`` written by ``facet`` is at log index ``index``, and the
        facet whose log holds it there (None: it was erased by a data operation)."""
        if self.data.is_replaced(facet):
            # Copies keep log indexes: any log holding the entry has it where it was written.
            locations = self.locations.get((facet, tag), [])
            if not locations:
                return None, None
            for log, at in locations:
                if at == index:
                    return None, log
            return f"replied log index {index!r}, but its entry is at {locations}", None
        entries = self._state(facet).log
        if not isinstance(index, int) or not 0 <= index < len(entries):
            return f"replied log index {index!r}, outside {facet}'s log of {len(entries)}", None
        if entries[index].tag != tag:
            return f"replied log index {index} of {facet}, which holds {entries[index]}", None
        return None, facet

    def _add_result(self, facet: str, tag: str, result: Value) -> str | None:
        if not (isinstance(result, list) and len(result) == 2):
            return f"malformed add result {result!r}"
        count, index = result
        problem, log = self._entry_at(facet, tag, index)
        if problem is not None or log is None:
            return problem
        assert isinstance(index, int)
        expected = self.counts[log][index]
        if count != expected:
            return f"replied count {count!r} at {log}[{index}], where the log makes {expected}"
        return None

    def _timer_result(self, facet: str, tag: str, result: Value) -> str | None:
        """``[log index, due ms]`` of a set, ``[log index, existed]`` of a cancel."""
        if not (isinstance(result, list) and len(result) == 2):
            return f"malformed timer result {result!r}"
        index, detail = result
        problem, log = self._entry_at(facet, tag, index)
        if problem is not None or log is None:
            return problem
        assert isinstance(index, int)
        entry = self._state(log).log[index]
        logged = entry.second[0] if isinstance(entry.second, list) else entry.second
        if detail != logged:
            return f"replied {detail!r}, but its log entry {entry} says {logged!r}"
        return None

    def _read_result(self, facet: str, key: str, result: Value) -> str | None:
        if not (isinstance(result, list) and len(result) == 2 and isinstance(result[1], int)):
            return f"malformed read result {result!r}"
        value, length = result[0], result[1]
        log = self._state(facet).log
        if not 0 <= length <= len(log):
            return f"read at log length {length}, beyond the durable {len(log)} of {facet}"
        expected = None
        for entry in log[:length]:
            if entry.kind == "put" and entry.first == key:
                expected = entry.second
        if value != expected:
            return f"read {key}={value!r} at length {length}; the log has {expected!r} there"
        return None

    # 6. real-time order -----------------------------------------------------------------

    def _check_order(self, facet: str) -> None:
        points = []
        for index, entry in enumerate(self._state(facet).log):
            operation = self.operations.get(entry.tag)
            if (entry.origin or facet) != facet:
                continue  # copied from another facet's log
            if operation is not None and entry.kind != TIMER_ENTRY:
                point = _point(operation, float(index))
                if self.data.is_replaced(facet):
                    # A delete or a restore drops the operation's idempotency record: the
                    # entry may be a repeat's application, acknowledged by that repeat.
                    latest = latest_apply(operation, facet)
                    known = operation.first_ok() is not None and not math.isinf(latest)
                    acknowledged = int(latest) if known else None
                    point = dataclasses.replace(point, acknowledged=acknowledged)
                points.append(point)
        for operation in self.operations.values():
            spec = operation.spec
            first = operation.first_ok()
            if spec.kind in READ_KINDS and spec.facet == facet and first is not None:
                if self.data.replaced_after(facet, operation.first_invoked()):
                    continue  # it read a log that a data operation replaced since
                result = first.result
                if isinstance(result, list) and len(result) == 2 and isinstance(result[1], int):
                    points.append(_point(operation, result[1] - 0.5))
        points.sort(key=lambda point: point.position)
        latest_invoked: _Point | None = None
        for _, group in itertools.groupby(points, key=lambda point: point.position):
            members = list(group)
            for point in members:
                if (
                    latest_invoked is not None
                    and point.acknowledged is not None
                    and point.acknowledged < latest_invoked.invoked
                ):
                    self.violations.append(
                        f"{facet}: {point.tag} (at {point.position}) was acknowledged at event "
                        f"{point.acknowledged}, before {latest_invoked.tag} (earlier in the "
                        f"log, at {latest_invoked.position}) was sent at event "
                        f"{latest_invoked.invoked}"
                    )
            for point in members:
                if latest_invoked is None or point.invoked > latest_invoked.invoked:
                    latest_invoked = point


def _point(operation: Operation, position: float) -> _Point:
    first = operation.first_ok()
    return _Point(
        position=position,
        invoked=operation.first_invoked(),
        acknowledged=None if first is None else first.completed,
        tag=operation.tag,
    )


def _entry_matches(operation: Operation, facet: str, entry: Entry) -> bool:
    spec = operation.spec
    if entry.kind == "add":
        on_own = spec.kind in ("add", "fail") and spec.facet == facet
        forwarded = spec.kind == "forward" and spec.target == facet
        return (on_own or forwarded) and entry.first == spec.by
    if entry.kind == "put":
        return (
            spec.kind == "put"
            and spec.facet == facet
            and (entry.first, entry.second) == (spec.key, spec.value)
        )
    if entry.kind == "forward":
        return (
            spec.kind == "forward"
            and spec.facet == facet
            and (entry.first, entry.second) == (spec.target, spec.by)
        )
    if entry.kind == "tset":
        return (
            spec.kind in ("tset", "tfail")
            and spec.facet == facet
            and entry.first == spec.name
            and isinstance(entry.second, list)
            and len(entry.second) == 4
            and entry.second[2:] == [spec.fail_until, spec.rearms]
        )
    if entry.kind == "tcancel":
        return spec.kind == "tcancel" and spec.facet == facet and entry.first == spec.name
    return False


def _outcomes(operation: Operation) -> str:
    return ", ".join(
        f"{a.status.value if a.status else 'in flight'}"
        f"{'/' + a.code if a.code else ''}{'/' + a.reason if a.reason else ''}"
        for a in operation.attempts
    )
