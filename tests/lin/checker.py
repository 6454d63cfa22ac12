"""A linearizability checker: Wing-Gong search with Lowe's memoisation, partitioned per key.

A history is a list of client operations, each with the process that issued it, the (facet, key)
it touched, what it asked, what it was told, and two client-side timestamps: when it was invoked
and when its reply arrived. An operation whose reply never came (a timeout, a dropped connection,
a crash) has ``complete_seconds=None``: its outcome is unknown, so it may have taken effect at any
moment after its invocation, or never. If the recorder knows a time after which it can no longer
take effect (the daemon process that could run it was killed and reaped), that time is its
``no_effect_after_seconds``: it took effect before then, or never.

The history is linearizable if there is one total order of (a subset of) its operations that

* contains every operation with a known outcome, and may contain any with an unknown outcome,
* respects real time: if A's reply arrived (or A's no-effect-after time passed) before B was
  invoked, A comes before B,
* is a legal run of the sequential specification (the model) with every known result matching.

Rules the checker relies on, and why:

* **Partitioning.** Operations on different (facet, key) pairs never interact in the models
  here, and linearizability is compositional (Herlihy & Wing's locality, P-compositionality in
  Porcupine): the history is linearizable iff each partition is. Each partition is searched on its
  own, which turns one exponential search into many small ones.
* **Ties are concurrency.** Equal timestamps could be either order; treating them as overlapping
  can only accept more histories, so the checker never rejects a history because of clock
  resolution.
* **Unknown reads are dropped.** A read changes nothing, so "never happened" is always a valid
  choice for a read whose reply was lost, and its result is unknown anyway.
* **A process is sequential.** Its operations must not overlap, and after an operation with an
  unknown outcome it issues nothing more (Jepsen's convention: the recorder gives a client that
  reconnects a fresh process id). A history that breaks this is a recorder bug: ``ValueError``.

The search (Lowe, "Testing for linearizability", 2017, after Wing & Gong 1993) keeps the call and
return events in time order in a doubly linked list. From each prefix, the candidates for the next
operation are those whose call events come before the first return event left in the list (the
*barrier*); placing one lifts its events out of the list. When every candidate fails: if the
barrier is the return of a known operation, the prefix is a dead end and the search backtracks;
if it is the no-effect-after time of an unknown outcome, that operation is dropped (it never
took effect) and the search goes on past it. A cache of (set of operations placed or dropped,
model state) pairs prunes every prefix whose futures were already explored: two prefixes with
the same operations decided and the same state have the same futures. The number of cached pairs
is bounded by ``states_max``; past it the partition's verdict is ``UNKNOWN``.

Unknown outcomes are what makes the search explode: one that never took effect stays a candidate
to the end of its partition (or to its no-effect-after time), and a naive search tries every
subset of them at every step. Three pruning rules, each exact (a history is accepted iff some
order exists), keep that linear in practice:

* **Known operations first.** Candidates with a known outcome are tried before unknown ones, so
  an unknown outcome is placed only where no known operation fits: a history whose unknown
  outcomes never took effect is checked in one pass.
* **No traceless placements.** An unknown outcome that would leave the state unchanged is not
  placed (leaving it out keeps more choices open), nor is an operation that overwrites the state
  whatever it was (``Model.overwrites``: a register write) placed right after one: the unknown
  outcome would leave no trace, so the order without it is as good.
* **Dead ends by model** (``Model.never_accepts``): for a counter whose amounts are never
  negative, a known operation that saw a smaller total than the current one can never be placed
  any more, so the prefix is abandoned at once.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, final

from tests.lin.models import (
    COUNTER,
    REGISTER,
    CounterModel,
    Model,
    Operation,
    OpKind,
    RegisterModel,
    StateT,
    Value,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "COUNTER",
    "REGISTER",
    "STATES_MAX_DEFAULT",
    "CheckResult",
    "CounterModel",
    "Explanation",
    "Model",
    "OpKind",
    "Operation",
    "PartitionKey",
    "PartitionResult",
    "RegisterModel",
    "Value",
    "Verdict",
    "check_history",
    "partition_history",
]


# One million cached (bitmask, state) pairs is a few hundred MB in CPython at worst and a few
# seconds of search: enough for partitions of hundreds of operations with a handful of processes.
STATES_MAX_DEFAULT = 1_000_000


class Verdict(enum.Enum):
    """The answer for a partition or a whole history."""

    LINEARIZABLE = "linearizable"
    NOT_LINEARIZABLE = "not linearizable"
    UNKNOWN = "unknown (search limit)"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionKey:
    """The (facet, key) pair a partition's operations share."""

    facet: str
    key: str

    def __str__(self) -> str:
        return f"{self.facet}:{self.key}"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    """Why a partition is not linearizable, at the deepest point the search reached.

    Attributes:
        linearized: The longest prefix the search could build, in order.
        state: The model state after that prefix (its repr).
        blocking: A completed operation that could not be placed after the prefix, although
            real time required it to come before everything still pending.
        unplaced: The candidates tried after the prefix and refused (``blocking`` among them).
    """

    linearized: tuple[Operation, ...]
    state: str
    blocking: Operation
    unplaced: tuple[Operation, ...]

    def __str__(self) -> str:
        lines = [f"after {len(self.linearized)} operations (state {self.state}):"]
        lines += [f"  placed    {op.describe()}" for op in self.linearized]
        lines += [f"  unplaced  {op.describe()}" for op in self.unplaced]
        lines.append(f"  and {self.blocking.describe()} had completed")
        return "\n".join(lines)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionResult:
    """The verdict for one (facet, key) partition and what the search cost."""

    partition: PartitionKey
    verdict: Verdict
    operations: int
    states_explored: int
    explanation: Explanation | None = None

    def __str__(self) -> str:
        text = f"{self.partition}: {self.verdict.value} ({self.operations} operations"
        text += f", {self.states_explored} states)"
        return text if self.explanation is None else f"{text}\n{self.explanation}"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """The verdict for a whole history: the worst of its partitions."""

    verdict: Verdict
    partitions: tuple[PartitionResult, ...] = field(default=())

    @property
    def failures(self) -> tuple[PartitionResult, ...]:
        """The partitions that are not linearizable or were not decided."""
        return tuple(p for p in self.partitions if p.verdict is not Verdict.LINEARIZABLE)

    def __str__(self) -> str:
        shown = self.failures or self.partitions
        return "\n".join([self.verdict.value, *(str(p) for p in shown)])


def partition_history(
    history: Sequence[Operation],
) -> dict[PartitionKey, list[Operation]]:
    """Split a history per (facet, key), dropping reads whose outcome is unknown.

    Raises:
        ValueError: The history is malformed (see :func:`check_history`).
    """
    _validate_processes(history)
    partitions: dict[PartitionKey, list[Operation]] = {}
    for op in history:
        if op.kind is OpKind.READ and not op.is_known:
            continue
        partitions.setdefault(PartitionKey(facet=op.facet, key=op.key), []).append(op)
    return partitions


def check_history(
    history: Sequence[Operation],
    model: Model[StateT],
    *,
    states_max: int = STATES_MAX_DEFAULT,
) -> CheckResult:
    """Decide whether ``history`` is linearizable with respect to ``model``, per (facet, key).

    Every partition is checked, so a failing result lists every failing partition.

    Args:
        history: The operations, in any order.
        model: The sequential specification each partition is checked against.
        states_max: Per partition, how many (linearized set, state) pairs the search may cache
            before it gives up with ``Verdict.UNKNOWN``.

    Returns:
        NOT_LINEARIZABLE if any partition is, else UNKNOWN if any hit the limit, else
        LINEARIZABLE.

    Raises:
        ValueError: The history is malformed: an operation completes before it was invoked, a
            process has overlapping operations or continues after an unknown outcome, or an
            operation's kind or values do not fit the model.
    """
    assert states_max > 0, states_max
    for op in history:
        _validate_operation(op, model)
    results = tuple(
        _check_partition(key, ops, model, states_max)
        for key, ops in partition_history(history).items()
    )
    verdicts = {r.verdict for r in results}
    verdict = Verdict.LINEARIZABLE
    if Verdict.NOT_LINEARIZABLE in verdicts:
        verdict = Verdict.NOT_LINEARIZABLE
    elif Verdict.UNKNOWN in verdicts:
        verdict = Verdict.UNKNOWN
    return CheckResult(verdict=verdict, partitions=results)


def _validate_operation(op: Operation, model: Model[StateT]) -> None:
    if op.kind not in model.kinds:
        raise ValueError(f"the {model.name} model has no {op.kind.value!r}: {op!r}")
    if op.complete_seconds is not None and op.complete_seconds < op.invoke_seconds:
        raise ValueError(f"operation completes before it was invoked: {op!r}")
    if op.no_effect_after_seconds is not None:
        if op.complete_seconds is not None:
            raise ValueError(f"only an unknown outcome has a no-effect-after time: {op!r}")
        if op.no_effect_after_seconds < op.invoke_seconds:
            raise ValueError(f"no effect after a time before its invocation: {op!r}")
    if op.kind is OpKind.INCREMENT and (
        isinstance(op.argument, bool) or not isinstance(op.argument, int)
    ):
        raise ValueError(f"an increment needs an integer amount: {op!r}")
    if op.kind is OpKind.CAS and op.is_known and not isinstance(op.result, bool):
        raise ValueError(f"a completed cas needs a boolean result: {op!r}")


def _validate_processes(history: Sequence[Operation]) -> None:
    by_process: dict[int, list[Operation]] = {}
    for op in history:
        by_process.setdefault(op.process_id, []).append(op)
    for process_id, ops in by_process.items():
        ops.sort(key=lambda op: op.invoke_seconds)
        for before, after in itertools.pairwise(ops):
            if before.complete_seconds is None:
                raise ValueError(
                    f"process {process_id} continues after an unknown outcome: {after!r}"
                )
            if after.invoke_seconds < before.complete_seconds:
                raise ValueError(f"process {process_id} has overlapping operations: {after!r}")


# Event kinds in the linked list. At equal times calls sort before returns: ties are overlap.
_CALL = 0
_RETURN = 1


@dataclass(slots=True)
class _Events:
    """Lowe's doubly linked list of call and return events; node ``head`` is a sentinel.

    Lifting an operation unlinks its call and return nodes; unlifting relinks them in reverse
    order (dancing links), which restores the list exactly because lifts and unlifts nest.
    """

    kind: list[int]
    op_index: list[int]
    next: list[int]
    prev: list[int]
    call_node: list[int]
    return_node: list[int]
    head: int

    @classmethod
    def build(cls, ops: Sequence[Operation]) -> _Events:
        assert ops, "a partition has at least one operation"
        events: list[tuple[float, int, int]] = []
        for i, op in enumerate(ops):
            events.append((op.invoke_seconds, _CALL, i))
            # An unknown outcome with a no-effect-after time gets a return node there too: the
            # search places it before that node or drops it at the node.
            end = op.complete_seconds if op.is_known else op.no_effect_after_seconds
            if end is not None:
                events.append((end, _RETURN, i))
        events.sort()
        count = len(events)
        head = count
        call_node = [-1] * len(ops)
        return_node = [-1] * len(ops)
        for node, (_, kind, i) in enumerate(events):
            (call_node if kind == _CALL else return_node)[i] = node
        return cls(
            kind=[kind for _, kind, _ in events] + [_CALL],
            op_index=[i for _, _, i in events] + [-1],
            # Node count - 1 links to -1, the end; the sentinel links to node 0.
            next=[*range(1, count), -1, 0],
            prev=[head, *range(count - 1), -1],
            call_node=call_node,
            return_node=return_node,
            head=head,
        )

    def first(self) -> int:
        return self.next[self.head]

    def _unlink(self, node: int) -> None:
        self.next[self.prev[node]] = self.next[node]
        if self.next[node] != -1:
            self.prev[self.next[node]] = self.prev[node]

    def _relink(self, node: int) -> None:
        self.next[self.prev[node]] = node
        if self.next[node] != -1:
            self.prev[self.next[node]] = node

    def lift(self, i: int) -> None:
        self._unlink(self.call_node[i])
        if self.return_node[i] != -1:
            self._unlink(self.return_node[i])

    def unlift(self, i: int) -> None:
        if self.return_node[i] != -1:
            self._relink(self.return_node[i])
        self._relink(self.call_node[i])


@dataclass(slots=True)
class _Frame(Generic[StateT]):
    """One configuration of the search: a prefix, the state after it, and what to try next.

    ``candidates`` are the operations that may come next: those whose call nodes precede the
    first return node left in the list (``barrier``), operations with a known outcome first.
    """

    state: StateT
    decided: int  # bit i set: ops[i] is in the prefix, or was dropped
    entry: int  # the operation placed or dropped to get here; -1 at the root
    dropped: bool  # entry was dropped (an unknown outcome past its deadline), not placed
    # The last operation placed has an unknown outcome: the next must not overwrite it.
    after_unknown: bool
    candidates: list[int]
    barrier: int
    tried: int = 0  # candidates tried so far
    # The known operation that can no longer be placed: what the explanation names.
    blocking: int = -1
    # Whether the barrier's own step (dropping an unknown outcome) remains to be tried.
    may_drop: bool = False


@final
class _Search(Generic[StateT]):
    """One partition's search: a depth-first walk over frames, with Lowe's cache."""

    def __init__(self, ops: Sequence[Operation], model: Model[StateT], states_max: int) -> None:
        self.ops = ops
        self.model = model
        self.states_max = states_max
        self.events = _Events.build(ops)
        self.never = model.never_accepts(ops)
        # Lowe's cache: the (decided, state) pairs visited. Two prefixes with the same
        # operations decided and the same state have the same futures. The value says whether
        # the visit was restricted (after an unknown outcome, see ``_Frame.after_unknown``): a
        # restricted visit explored fewer futures, so it does not stand for a free one.
        self.cache: dict[tuple[int, StateT], bool] = {}
        self.deepest: Explanation | None = None

    def run(self) -> Verdict:
        ops, model, events = self.ops, self.model, self.events
        # Unknown-outcome operations may stay unplaced: done when every known one is placed.
        pending_known = sum(op.is_known for op in ops)
        if not pending_known:
            return Verdict.LINEARIZABLE
        root = self._frame(
            model.initial(), 0, -1, dropped=False, after_unknown=False, start=events.first()
        )
        stack = [root]
        while True:
            frame = stack[-1]
            if frame.tried < len(frame.candidates):
                i = frame.candidates[frame.tried]
                frame.tried += 1
                op = ops[i]
                if frame.after_unknown and model.overwrites(op):
                    continue
                accepted, after = model.step(frame.state, op)
                if not accepted or (not op.is_known and after == frame.state):
                    # An unknown outcome that changes nothing might as well not have happened;
                    # leaving it unplaced keeps more choices open.
                    continue
                decided = frame.decided | (1 << i)
                visit = self._visit(decided, after, restricted=not op.is_known)
                if visit is None:
                    return Verdict.UNKNOWN
                if not visit:
                    continue
                events.lift(i)
                pending_known -= ops[i].is_known
                if not pending_known:
                    return Verdict.LINEARIZABLE
                stack.append(
                    self._frame(
                        after,
                        decided,
                        i,
                        dropped=False,
                        after_unknown=not op.is_known,
                        start=events.first(),
                    )
                )
            elif frame.may_drop:
                # The barrier is the deadline of an unknown outcome still unplaced: past it the
                # operation can no longer take effect, so it is dropped. Every candidate before
                # it was tried from this frame, which had one more choice, and failed; so the
                # walk goes on after the barrier rather than from the head.
                frame.may_drop = False
                j = events.op_index[frame.barrier]
                decided = frame.decided | (1 << j)
                visit = self._visit(decided, frame.state, restricted=frame.after_unknown)
                if visit is None:
                    return Verdict.UNKNOWN
                if not visit:
                    continue
                events.lift(j)
                start = events.next[frame.barrier]
                stack.append(
                    self._frame(
                        frame.state,
                        decided,
                        j,
                        dropped=True,
                        after_unknown=frame.after_unknown,
                        start=start,
                    )
                )
            else:
                if frame.blocking != -1:
                    self._remember(stack, frame)
                stack.pop()
                if not stack:
                    return Verdict.NOT_LINEARIZABLE
                events.unlift(frame.entry)
                pending_known += ops[frame.entry].is_known

    def _visit(self, decided: int, state: StateT, *, restricted: bool) -> bool | None:
        """Cache a configuration: True if new, False if seen, None if the cache is full."""
        key = (decided, state)
        seen_restricted = self.cache.get(key)
        if seen_restricted is not None and (restricted or not seen_restricted):
            return False
        if seen_restricted is None and len(self.cache) >= self.states_max:
            return None
        self.cache[key] = restricted
        return True

    def _frame(
        self,
        state: StateT,
        decided: int,
        entry: int,
        *,
        dropped: bool,
        after_unknown: bool,
        start: int,
    ) -> _Frame[StateT]:
        """The frame after a step, with its candidates from node ``start`` to the barrier."""
        events, ops = self.events, self.ops
        known: list[int] = []
        unknown: list[int] = []
        node = start
        while node != -1 and events.kind[node] == _CALL:
            i = events.op_index[node]
            (known if ops[i].is_known else unknown).append(i)
            node = events.next[node]
        # A known operation is still pending, so its return node lies ahead.
        assert node != -1
        # Known candidates first: an unknown outcome is placed only when no known operation
        # fits, so an unknown operation that never took effect costs one failed try per step
        # instead of doubling the search.
        frame = _Frame(state, decided, entry, dropped, after_unknown, known + unknown, node)
        j = events.op_index[node]
        if ops[j].is_known:
            frame.blocking = j
        else:
            frame.may_drop = True
        if self.never is not None:
            # A known operation that must still come, yet that no state reachable from here
            # accepts (for a counter that only grows: a total already passed), makes this
            # prefix a dead end at once.
            for i in [*known, j]:
                if ops[i].is_known and self.never(state, ops[i]):
                    frame.tried, frame.blocking, frame.may_drop = len(frame.candidates), i, False
                    break
        return frame

    def _remember(self, stack: list[_Frame[StateT]], frame: _Frame[StateT]) -> None:
        # Keep the first dead end at the greatest depth: the longest prefix is the shortest
        # story of what went wrong (Porcupine reports the same).
        placed = [f.entry for f in stack[1:] if not f.dropped]
        if self.deepest is not None and len(self.deepest.linearized) >= len(placed):
            return
        self.deepest = Explanation(
            linearized=tuple(self.ops[i] for i in placed),
            state=repr(frame.state),
            blocking=self.ops[frame.blocking],
            unplaced=tuple(self.ops[i] for i in frame.candidates),
        )


def _check_partition(
    key: PartitionKey, ops: Sequence[Operation], model: Model[StateT], states_max: int
) -> PartitionResult:
    search = _Search(ops, model, states_max)
    verdict = search.run()
    return PartitionResult(
        partition=key,
        verdict=verdict,
        operations=len(ops),
        states_explored=len(search.cache),
        explanation=search.deepest if verdict is Verdict.NOT_LINEARIZABLE else None,
    )
