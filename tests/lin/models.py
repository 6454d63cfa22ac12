"""What the linearizability checker checks: operations, and the models they are checked against.

An :class:`Operation` is one client call as a recorder saw it; a :class:`Model` is a sequential
specification (an initial state and a transition per operation). Two models: a register with
compare-and-swap (:data:`REGISTER`) and a counter (:data:`COUNTER`). See ``checker.py`` for the
search and ``docs/linearizability.md`` for the rules a recorder follows.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, final

# A register holds one of these; None means "absent" (a key never written).
Value = None | bool | int | str | bytes


class OpKind(enum.Enum):
    """What an operation asked for; each model accepts a subset."""

    READ = "read"
    WRITE = "write"
    CAS = "cas"
    INCREMENT = "increment"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One client operation as the recorder saw it.

    Attributes:
        process_id: The client process (one operation at a time) that issued it.
        facet: The facet touched, e.g. ``"tenant/agent"``; with ``key``, the partition.
        key: The key (register or counter) within the facet.
        kind: What was asked.
        argument: WRITE: the value written; CAS: the new value; INCREMENT: the amount.
        expected: CAS only: the value the register must hold for the swap to happen.
        result: READ: the value seen; CAS: whether it swapped; INCREMENT: the new total;
            WRITE: None. Ignored when the outcome is unknown.
        invoke_seconds: Client clock when the request was sent.
        complete_seconds: Client clock when the reply arrived; None if it never did.
        no_effect_after_seconds: Unknown outcomes only: client clock by which the operation
            has taken effect or never will, e.g. once the server process that could run it
            has exited. None: no such time, it may take effect at any point after its
            invocation.
    """

    process_id: int
    facet: str
    key: str
    kind: OpKind
    argument: Value = None
    expected: Value = None
    result: Value = None
    invoke_seconds: float
    complete_seconds: float | None
    no_effect_after_seconds: float | None = None

    @property
    def is_known(self) -> bool:
        """Whether the reply arrived, so the operation certainly happened with ``result``."""
        return self.complete_seconds is not None

    def describe(self) -> str:
        """A one-line human description, for failure explanations."""
        if self.kind is OpKind.READ:
            what = f"read -> {self.result!r}"
        elif self.kind is OpKind.WRITE:
            what = f"write {self.argument!r}"
        elif self.kind is OpKind.CAS:
            what = f"cas {self.expected!r}->{self.argument!r}"
            what += f" = {self.result!r}" if self.is_known else ""
        else:
            what = f"increment {self.argument!r}"
            what += f" -> {self.result!r}" if self.is_known else ""
        end = "unknown" if self.complete_seconds is None else f"{self.complete_seconds:g}"
        if self.no_effect_after_seconds is not None:
            end += f" by {self.no_effect_after_seconds:g}"
        return f"p{self.process_id} {what} [{self.invoke_seconds:g}, {end}]"


StateT = TypeVar("StateT", bound=Hashable)


class Model(Protocol[StateT]):
    """A sequential specification: an initial state and a transition per operation.

    States must be hashable and compare by value: the search caches them.
    """

    @property
    def name(self) -> str: ...

    @property
    def kinds(self) -> frozenset[OpKind]: ...

    def initial(self) -> StateT: ...

    def step(self, state: StateT, op: Operation) -> tuple[bool, StateT]:
        """Apply ``op`` to ``state``.

        Returns ``(False, state)`` if ``op`` cannot happen in ``state`` with its recorded
        result; otherwise ``(True, next_state)``. For an operation with an unknown outcome the
        result is not checked: only the effect is applied.
        """
        ...

    def never_accepts(self, ops: Sequence[Operation]) -> Callable[[StateT, Operation], bool] | None:
        """A test for the search to prune with, valid for a partition made of ``ops``.

        The test answers whether ``op``, with its known result, is refused in ``state`` and in
        every state reachable from it by operations of ``ops``. None: no such test (no
        pruning beyond the cache).
        """
        ...

    def overwrites(self, op: Operation) -> bool:
        """Whether ``op`` is accepted in every state and leaves the same state whatever the
        state before it (a register write). An unknown outcome placed just before such an
        operation would leave no trace, so the search never does that."""
        ...


def _same(a: Value, b: Value) -> bool:
    # 1 == True in Python; a register that held True must not satisfy a read of 1.
    return type(a) is type(b) and a == b


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterModel:
    """A register: READ returns the last value written; WRITE sets it; CAS swaps if equal."""

    initial_value: Value = None
    name: str = "register"
    kinds: frozenset[OpKind] = frozenset({OpKind.READ, OpKind.WRITE, OpKind.CAS})

    def initial(self) -> tuple[str, Value]:
        return _tagged(self.initial_value)

    def step(self, state: tuple[str, Value], op: Operation) -> tuple[bool, tuple[str, Value]]:
        current = state[1]
        if op.kind is OpKind.READ:
            return _same(op.result, current), state
        if op.kind is OpKind.WRITE:
            return True, _tagged(op.argument)
        assert op.kind is OpKind.CAS, op
        swaps = _same(op.expected, current)
        if op.is_known and op.result is not swaps:
            return False, state
        return True, _tagged(op.argument) if swaps else state

    def never_accepts(
        self, ops: Sequence[Operation]
    ) -> Callable[[tuple[str, Value], Operation], bool] | None:
        # A write can bring back any value: no state is ever a dead end by itself.
        return None

    def overwrites(self, op: Operation) -> bool:
        return op.kind is OpKind.WRITE


def _tagged(value: Value) -> tuple[str, Value]:
    # The type name keeps 1 and True apart in the search cache, where they hash and compare equal.
    return type(value).__name__, value


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class CounterModel:
    """A counter: INCREMENT by n returns the new total; READ returns the total."""

    initial_value: int = 0
    name: str = "counter"
    kinds: frozenset[OpKind] = frozenset({OpKind.READ, OpKind.INCREMENT})

    def initial(self) -> int:
        return self.initial_value

    def step(self, state: int, op: Operation) -> tuple[bool, int]:
        if op.kind is OpKind.READ:
            return _same(op.result, state), state
        assert op.kind is OpKind.INCREMENT, op
        assert isinstance(op.argument, int), op
        total = state + op.argument
        if op.is_known and not _same(op.result, total):
            return False, state
        return True, total

    def never_accepts(self, ops: Sequence[Operation]) -> Callable[[int, Operation], bool] | None:
        # When no amount is negative the total never goes down, so a known operation that
        # needed a smaller total than the current one can never be placed any more.
        if any(op.kind is OpKind.INCREMENT and _amount(op) < 0 for op in ops):
            return None
        return _total_passed

    def overwrites(self, op: Operation) -> bool:
        return False


def _amount(op: Operation) -> int:
    assert isinstance(op.argument, int), op
    return op.argument


def _total_passed(state: int, op: Operation) -> bool:
    """Whether the total ``op`` saw (a read) or started from (an increment) is below ``state``."""
    assert op.is_known, op
    if op.kind is OpKind.READ:
        return isinstance(op.result, int) and op.result < state
    return isinstance(op.result, int) and op.result - _amount(op) < state


REGISTER = RegisterModel()
COUNTER = CounterModel()
