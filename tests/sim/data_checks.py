"""The data operations' guarantees (decision 0008), held against the facets' final logs.

A data operation that may have changed a facet (a delete, a clone onto it, a transfer's
import, a restore) is a *replacement*: at one instant between its start and its end (its
swap, under the facet's hold) the facet's whole state became the replacement's *base*: empty
(delete) or a copy of a source facet taken at one instant of a *window* (the clone itself;
a transfer's export; the backup a restore installs). Logs are append-only between
replacements, and every entry names the facet that wrote it, so a facet's final log must be

    base + entries the facet wrote after the swap

for one replacement that may have taken effect and that no replacement known to have
completed followed (or for no replacement at all: the empty base of a facet never replaced).
What is checked, for each candidate until one explains the log:

- *the suffix*: written by the facet itself, by operations that could still apply after the
  replacement began; and it holds every write acknowledged on the facet that was sent after
  the replacement ended (writes acknowledged after an operation completed are never lost);
- *the base*: empty for a delete (the facet starts empty); for a copy, exactly the log read
  from the export or the backup when the harness has it, and in any case a *snapshot* of the
  source: no entry of an operation sent after the window ended; every write acknowledged on
  the source before the window began, unless a replacement of the source could have erased
  it first (a backup holds every write acknowledged before it began); and, when nothing
  replaced the source after the window began, a prefix of the source's final log.

A copy of a clone is not read by the harness: every split of the log into base and suffix is
tried (the set of possible states). A crash during an operation leaves it unknown: both its
base and the state before it are candidates, never a mix of the two (a mixed log is no base
plus suffix). The state itself (counter, registers) is the replay of the log, checked by the
general checker. Backups and exports are checked as snapshots whether or not they are
installed later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .history import Status

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from .checker import Entry, FacetState
    from .history import DataOp, Operation

WRITE_KINDS = frozenset({"add", "put", "forward", "tset", "tcancel"})
TIMER_ENTRY = "fire"
DEPTH_MAX = 6  # copies of copies checked this deep (clones between two facets form cycles)


@dataclass(frozen=True, slots=True)
class Base:
    """What a replacement installs: empty, or a snapshot of ``source`` taken in
    [``start``, ``end``] (event numbers; ``end`` infinite when unknown)."""

    source: str | None  # None: empty (a delete)
    start: int = 0
    end: float = 0.0
    exact: tuple[Entry, ...] | None = None  # the copy's log, when the harness read it


@dataclass(frozen=True, slots=True)
class Replacement:
    tag: str
    facet: str
    start: int
    end: float  # math.inf: it may still have swapped at any later time
    completed: bool  # it took effect
    base: Base


def replacements(data_ops: Sequence[DataOp]) -> dict[str, list[Replacement]]:
    """facet -> the data operations that may have replaced its state, in start order."""
    found: dict[str, list[Replacement]] = {}
    for operation in data_ops:
        spec = operation.spec
        if spec.kind == "backup" or not operation.may_have_changed():
            continue
        end = math.inf if operation.ended is None else float(operation.ended)
        if spec.kind == "delete":
            base = Base(None)
        elif spec.kind == "clone":
            base = Base(spec.source, operation.started, end)
        elif spec.kind == "transfer":
            if operation.entries is None:
                continue  # the export never completed: the import never began
            copied = math.inf if operation.copied is None else float(operation.copied)
            base = Base(spec.source, operation.started, copied, _entries(operation))
        else:
            assert spec.kind == "restore"
            backup = operation.copied_from
            assert backup is not None
            assert backup.ended is not None
            base = Base(backup.spec.facet, backup.started, float(backup.ended), _entries(backup))
        found.setdefault(spec.facet, []).append(
            Replacement(
                tag=spec.tag,
                facet=spec.facet,
                start=operation.started,
                end=end,
                completed=operation.status is Status.OK,
                base=base,
            )
        )
    return found


def _entries(operation: DataOp) -> tuple[Entry, ...]:
    from .checker import Entry

    rows = operation.entries
    assert rows is not None
    entries = []
    for row in rows:
        assert isinstance(row, list), row
        assert len(row) == 5, row
        tag, kind, first, second, written_by = row
        assert isinstance(tag, str)
        assert isinstance(kind, str)
        assert isinstance(written_by, str)
        entries.append(Entry(tag=tag, kind=kind, first=first, second=second, origin=written_by))
    return tuple(entries)


def latest_apply(operation: Operation, facet: str | None = None) -> float:
    """The latest event at which the operation could have been applied to ``facet`` (its
    own by default; infinite while an attempt's outcome is unknown: the runtime may still
    run it). A forward's add on its target commits before the forward does: a forward that
    failed afterwards may have applied it."""
    spec = operation.spec
    inner = spec.kind == "forward" and facet is not None and facet == spec.target
    latest = 0.0
    for attempt in operation.attempts:
        if attempt.status is Status.OK or (inner and attempt.status is Status.FAILED):
            latest = max(latest, float(attempt.completed or 0))
        elif attempt.status is not Status.FAILED:
            return math.inf
    return latest


def _writes_on(operation: Operation, facet: str) -> bool:
    """The operation writes an entry into ``facet``'s log when it applies."""
    spec = operation.spec
    if spec.raises or spec.kind not in WRITE_KINDS:
        return False
    return spec.facet == facet or (spec.kind == "forward" and spec.target == facet)


class DataChecker:
    def __init__(
        self,
        operations: Mapping[str, Operation],
        states: Mapping[str, FacetState],
        data_ops: Sequence[DataOp],
    ) -> None:
        self.operations = operations
        self.states = states
        self.data_ops = data_ops
        self.replaced = replacements(data_ops)
        self.violations: list[str] = []
        self._memo: dict[tuple[object, ...], str | None] = {}
        # facet -> operations whose applications write into its log (acknowledged ones)
        self.acknowledged: dict[str, list[Operation]] = {}
        for operation in operations.values():
            if operation.first_ok() is None:
                continue
            places = {operation.spec.facet, operation.spec.target or operation.spec.facet}
            for facet in places:
                if _writes_on(operation, facet):
                    self.acknowledged.setdefault(facet, []).append(operation)

    def is_replaced(self, facet: str) -> bool:
        return bool(self.replaced.get(facet))

    def replaced_after(self, facet: str, event: float) -> bool:
        """A replacement of ``facet`` may have swapped after ``event``."""
        return any(r.end > event for r in self.replaced.get(facet, ()))

    def run(self) -> None:
        for facet, reps in self.replaced.items():
            state = self.states.get(facet)
            log = [] if state is None else state.log
            problem = self._explain(facet, log, math.inf, math.inf, 0)
            if problem is not None:
                self.violations.append(
                    f"{facet}: data operations {[r.tag for r in reps]} cannot explain its "
                    f"final log of {len(log)} entries: {problem}"
                )
        for operation in self.data_ops:
            spec = operation.spec
            if operation.entries is None or spec.kind not in ("backup", "transfer"):
                continue
            source = spec.facet if spec.kind == "backup" else spec.source
            end = operation.ended if spec.kind == "backup" else operation.copied
            entries = list(_entries(operation))
            problem = self._snapshot_problem(
                source, entries, operation.started, math.inf if end is None else float(end), 0
            )
            if problem is not None:
                self.violations.append(
                    f"{spec.kind} {spec.tag} of {source} ({operation.status}): its copy is no "
                    f"snapshot of {source}: {problem}"
                )

    # -- a facet's log at some instant ---------------------------------------------------

    def _explain(
        self, facet: str, log: list[Entry], low: float, high: float, depth: int
    ) -> str | None:
        """Why ``log`` cannot be ``facet``'s log at some instant in [``low``, ``high``] (the
        final log: both infinite), or None if it can."""
        if depth > DEPTH_MAX:
            return None  # copies of copies of copies: accepted (a cycle of clones)
        key = (facet, tuple((e.origin, e.tag, e.kind) for e in log), low, high)
        if key in self._memo:
            return self._memo[key]
        reasons = []
        reps = [r for r in self.replaced.get(facet, ()) if r.start < high]
        candidates: list[Replacement | None] = [None, *reps]
        for candidate in candidates:
            start = 0 if candidate is None else candidate.start
            end = 0.0 if candidate is None else candidate.end
            name = "no replacement" if candidate is None else f"{candidate.tag}"
            later = [
                r.tag
                for r in reps
                if r is not candidate and r.completed and r.start > end and r.end < low
            ]
            if later:
                reasons.append(f"{name}: {later} completed after it")
                continue
            base = Base(None) if candidate is None else candidate.base
            if base.source is None:
                splits: list[int] = [0]
            elif base.exact is not None:
                size = len(base.exact)
                splits = [size] if tuple(log[:size]) == base.exact else []
                if not splits:
                    reasons.append(f"{name}: the log does not begin with its copy")
            else:
                splits = list(range(len(log), -1, -1))
            for split in splits:
                problem = self._suffix_problem(facet, log, split, start, end, low, high)
                if problem is None and base.source is not None and base.exact is None:
                    problem = self._snapshot_problem(
                        base.source, log[:split], base.start, base.end, depth + 1
                    )
                if problem is None:
                    self._memo[key] = None
                    return None
                if len(splits) == 1 or split == 0:
                    reasons.append(f"{name} (base of {split} entries): {problem}")
        answer = "; ".join(reasons)
        self._memo[key] = answer
        return answer

    def _suffix_problem(
        self,
        facet: str,
        log: list[Entry],
        split: int,
        start: int,
        end: float,
        low: float,
        high: float,
    ) -> str | None:
        """``log[split:]`` as what ``facet`` wrote after a replacement in [start, end], up
        to an instant in [low, high]."""
        seen = set()
        for index in range(split, len(log)):
            entry = log[index]
            if entry.origin != facet:
                return f"[{index}] {entry.tag} was written by {entry.origin}, after the base"
            seen.add(entry.tag)
            if entry.kind == TIMER_ENTRY:
                continue
            operation = self.operations.get(entry.tag)
            if operation is None:
                continue  # reported by the general checker
            if latest_apply(operation, facet) < start:
                return f"[{index}] {entry.tag} was done before the replacement began"
            if operation.first_invoked() > high:
                return f"[{index}] {entry.tag} was sent after the copy ended"
        for operation in self.acknowledged.get(facet, ()):
            first = operation.first_ok()
            assert first is not None
            assert first.completed is not None
            if (
                operation.first_invoked() > end
                and first.completed < low
                and operation.tag not in seen
            ):
                return (
                    f"{operation.spec.kind} {operation.tag}, sent after the replacement ended "
                    "and acknowledged before the log was read, is missing"
                )
        return None

    def _snapshot_problem(
        self, source: str, entries: list[Entry], low: float, high: float, depth: int
    ) -> str | None:
        """``entries`` as a copy of ``source`` taken at an instant in [low, high]."""
        if not self.replaced_after(source, low):
            # Nothing replaced the source since: its log then is a prefix of its final log.
            state = self.states.get(source)
            final = [] if state is None else state.log
            if final[: len(entries)] != entries:
                return f"not a prefix of {source}'s final log (nothing replaced {source} since)"
        problem = self._explain(source, entries, low, high, depth)
        if problem is not None:
            return f"not a state of {source} then: {problem}"
        return None
