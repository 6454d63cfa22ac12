"""What the daemon crash loop must find after each restart, from what the clients recorded.

Each class follows one kind of facet. ``add`` takes a recorded call (a linearizability
:class:`~tests.lin.checker.Operation` or a :class:`~tests.crash.daemon_worker.CallRecord`),
``check`` takes what the parent read after the restart and returns :class:`Findings`. Every
record is added while the clients are paused, so a check sees every outcome up to the kill;
unknown outcomes (no reply) may or may not have taken effect. Rules:

* **Counter** (``increment(by)`` returns the new total): the value read is at least the sum of
  the acknowledged increments and at most that plus the unknown ones, and at least every total
  a client was told or an earlier check read (totals only grow). An acknowledged increment whose
  total exceeds the value read is lost.
* **Register** (``put``/``cas``, unique values): the value read was written by a write (or a
  successful cas) that was acknowledged or had an unknown outcome, or read by the last check,
  and that no acknowledged write invoked after its end (its reply, or the kill for an unknown
  outcome) superseded; the initial None only while nothing was acknowledged or read. Anything
  else means the acknowledged state was lost.
* **Memory** (``append_turn(role, text)`` returns the turn's sequence number): turns never go
  back; each acknowledged turn is at its sequence number with its text; every turn is one some
  client started, once (no turn applied twice).
* **Timer** (``set(name, ...)`` of an ``Alarm``): an acknowledged timer is still pending or has
  fired; a timer fires at most once, and only if some client set it.
* **Fresh counter** (one increment on a new facet): acknowledged, it holds its amount; unknown,
  it is absent, empty or holds its amount.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.lin.checker import OpKind

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from facetrt import Value
    from tests.crash.daemon_worker import CallRecord
    from tests.lin.checker import Operation


@dataclass(slots=True)
class Findings:
    """What one check found: problems (empty when all is well) and lost acknowledged writes."""

    problems: list[str] = field(default_factory=list)
    lost: int = 0

    def add(self, other: Findings) -> None:
        self.problems += other.problems
        self.lost += other.lost

    def lose(self, count: int, problem: str) -> None:
        self.lost += count
        self.problems.append(problem)


def _end(op: Operation) -> float:
    """When an operation's effect was certainly over: its reply, else its no-effect time."""
    if op.complete_seconds is not None:
        return op.complete_seconds
    return op.no_effect_after_seconds if op.no_effect_after_seconds is not None else math.inf


@dataclass(slots=True)
class CounterExpectation:
    name: str
    acknowledged_sum: int = 0
    unknown_sum: int = 0
    totals: list[int] = field(default_factory=list)  # acknowledged increments' totals
    seen_max: int = 0  # the largest total any known call returned

    @property
    def acknowledged(self) -> int:
        return len(self.totals)

    def add(self, op: Operation) -> None:
        if op.kind is OpKind.INCREMENT:
            assert isinstance(op.argument, int)
            if not op.is_known:
                self.unknown_sum += op.argument
                return
            self.acknowledged_sum += op.argument
            assert isinstance(op.result, int), op
            self.totals.append(op.result)
        if op.is_known and isinstance(op.result, int):
            self.seen_max = max(self.seen_max, op.result)

    def check(self, value: int) -> Findings:
        """Check the value read after a restart; it is then a total seen, like any other (what
        one restart found must still be there after the next)."""
        findings = Findings()
        lost = sum(total > value for total in self.totals)
        if lost or value < self.acknowledged_sum:
            findings.lose(
                max(lost, 1),
                f"{self.name}: read {value}, but acknowledged increments sum to "
                f"{self.acknowledged_sum} and totals up to {max(self.totals, default=0)} were "
                f"acknowledged ({lost} above the value read)",
            )
        elif value < self.seen_max:
            findings.problems.append(f"{self.name}: read {value} after {self.seen_max} was seen")
        if value > self.acknowledged_sum + self.unknown_sum:
            findings.problems.append(
                f"{self.name}: read {value}, more than the {self.acknowledged_sum} acknowledged "
                f"plus {self.unknown_sum} unknown"
            )
        self.seen_max = max(self.seen_max, value)
        return findings


@dataclass(slots=True)
class RegisterExpectation:
    name: str
    # (value, invoke, end, acknowledged) of every write that may hold the register: pruned
    # as acknowledged writes supersede them.
    writes: list[tuple[Value, float, float, bool]] = field(default_factory=list)
    latest_acknowledged_invoke: float = -math.inf
    acknowledged: int = 0
    read: bool = False  # checked once: the value read then stands for every write before it

    def add(self, op: Operation) -> None:
        if op.kind is OpKind.READ:
            return
        if op.is_known and op.kind is OpKind.CAS and op.result is not True:
            return  # a failed cas wrote nothing
        if op.is_known:
            self.acknowledged += 1
            self.latest_acknowledged_invoke = max(
                self.latest_acknowledged_invoke, op.invoke_seconds
            )
        self.writes.append((op.argument, op.invoke_seconds, _end(op), op.is_known))

    def check(self, value: Value, at: float) -> Findings:
        """Check the value read at ``at`` after a restart, with no call in flight; from then on
        that value is the one to supersede (what one restart found must survive the next)."""
        findings = Findings()
        # A write that ended before an acknowledged write began was overwritten for good.
        self.writes = [w for w in self.writes if w[2] >= self.latest_acknowledged_invoke]
        possible = {repr(w[0]) for w in self.writes}
        if not self.acknowledged and not self.read:
            possible.add(repr(None))
        if repr(value) not in possible:
            latest = [w[0] for w in self.writes if w[3]]
            findings.lose(
                1,
                f"{self.name}: read {value!r}, not one of the writes that may be the last "
                f"(acknowledged: {latest[-3:]!r})",
            )
        self.writes = [(value, at, at, True)]
        self.read = True
        return findings


@dataclass(slots=True)
class MemoryExpectation:
    name: str
    started: set[str] = field(default_factory=set)  # texts of every append made
    new_acknowledged: dict[int, str] = field(default_factory=dict)  # since the last check
    acknowledged: int = 0
    unknown: int = 0
    turns: int = 0  # turns read at the last check
    texts_read: set[str] = field(default_factory=set)

    def add(self, record: CallRecord) -> None:
        _role, text = record.args
        assert isinstance(text, str)
        self.started.add(text)
        if not record.is_known:
            self.unknown += 1
            return
        assert isinstance(record.result, int), record
        self.acknowledged += 1
        if record.result in self.new_acknowledged:
            raise ValueError(f"{self.name}: sequence {record.result} acknowledged twice")
        self.new_acknowledged[record.result] = text

    def check(self, turns: int, new_turns: list[Value]) -> Findings:
        """``turns``: the count read; ``new_turns``: the turns from the last check's count on."""
        findings = Findings()
        if turns < self.turns:
            findings.lose(self.turns - turns, f"{self.name}: {turns} turns, {self.turns} before")
        texts: list[str] = []
        for turn in new_turns:
            assert isinstance(turn, dict), turn
            text = turn.get("text")
            assert isinstance(text, str), turn
            texts.append(text)
            if text not in self.started:
                findings.problems.append(f"{self.name}: turn {text!r} was never appended")
            elif text in self.texts_read:
                findings.problems.append(f"{self.name}: turn {text!r} appears twice")
            self.texts_read.add(text)
        for seq, text in sorted(self.new_acknowledged.items()):
            index = seq - self.turns
            if not 0 <= index < len(texts) or texts[index] != text:
                found = texts[index] if 0 <= index < len(texts) else "nothing"
                findings.lose(1, f"{self.name}: turn {seq} acknowledged as {text!r}, {found!r}")
        self.turns = max(turns, self.turns)
        self.new_acknowledged = {}
        return findings


@dataclass(slots=True)
class StatsExpectation:
    """The tenant-wide turn counter that every append increments (a facet-to-facet call made
    before the append's own turn is durable, so it may count turns a kill then lost)."""

    name: str

    def check(self, value: int, memories: Iterable[MemoryExpectation]) -> Findings:
        findings = Findings()
        acknowledged = sum(memory.acknowledged for memory in memories)
        turns = sum(memory.turns for memory in memories)
        unknown = sum(memory.unknown for memory in memories)
        if value < acknowledged:
            findings.lose(acknowledged - value, f"{self.name}: {value} < {acknowledged} acked")
        if value > turns + unknown:
            findings.problems.append(
                f"{self.name}: {value}, more than {turns} turns plus {unknown} unknown appends"
            )
        return findings


@dataclass(slots=True)
class TimerExpectation:
    name: str
    started: set[str] = field(default_factory=set)
    acknowledged: set[str] = field(default_factory=set)

    def add(self, record: CallRecord) -> None:
        timer = record.args[0]
        assert isinstance(timer, str)
        self.started.add(timer)
        if record.is_known:
            self.acknowledged.add(timer)

    def check(self, pending: set[str], fired: Mapping[str, Value]) -> Findings:
        """``pending`` must be read before ``fired``: a timer that fires in between is then in
        both, never in neither."""
        findings = Findings()
        for timer, count in fired.items():
            if count != 1:
                findings.problems.append(f"{self.name}: timer {timer!r} fired {count!r} times")
        for timer in (pending | set(fired)) - self.started:
            findings.problems.append(f"{self.name}: timer {timer!r} was never set")
        lost = sorted(self.acknowledged - pending - set(fired))
        if lost:
            findings.lose(len(lost), f"{self.name}: acknowledged timers gone: {lost[:5]}")
        return findings


@dataclass(slots=True)
class FreshExpectation:
    """Fresh counters created since the last check, each checked once."""

    new: dict[str, tuple[int, bool]] = field(default_factory=dict)  # facet -> (amount, known)
    acknowledged: int = 0

    def add(self, record: CallRecord) -> None:
        (amount,) = record.args
        assert isinstance(amount, int)
        if record.is_known:
            self.acknowledged += 1
            if record.result != amount:
                raise ValueError(f"{record.facet}: first increment returned {record.result!r}")
        self.new[record.facet] = (amount, record.is_known)

    def check(self, values: Mapping[str, int | None]) -> Findings:
        """``values``: what each new facet holds (None: no such facet)."""
        findings = Findings()
        for facet, (amount, known) in self.new.items():
            value = values[facet]
            if known and value != amount:
                findings.lose(1, f"{facet}: acknowledged {amount}, read {value!r}")
            elif not known and value not in (None, 0, amount):
                findings.problems.append(f"{facet}: {amount} or nothing, read {value!r}")
        self.new = {}
        return findings
