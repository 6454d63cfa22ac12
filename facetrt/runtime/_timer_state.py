"""TimerState: one activation's view of its facet's timers, and the index hint it keeps.

``durable`` maps every timer the store holds *or will hold once the commit in flight is done*
to ``(due_ms, failed)``: a layer's timer writes are applied when the activation turns it into a
commit (:meth:`TimerState.plan`). Should that commit fail, the activation drops this state at
once (and stops), so it never describes writes that were lost: the running message, which may
go on until its next checkpoint, reloads its timers from the store. Writes of messages not yet
in a commit live only in the layers above, where reads see them first.

A heap of ``(due_ms, name)`` finds the earliest scheduled timer; entries replaced since they
were pushed are skipped lazily, and the heap is rebuilt when stale entries dominate it.

The hint. Before a commit that makes a timer due earlier than the node index's hint for this
facet, the index is lowered; after a commit that leaves the earliest timer later (or none), the
hint is settled to it. :func:`commit_with_hints` runs both around the facet commit, on a writer
thread. ``hint_known`` is False at activation: the first planned commit then lowers and
settles unconditionally (both read the index's current value inside their own transaction).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from .._errors import StorageError
from ..storage import TIMERS_DB
from ._layers import MISSING, lookup_timer
from ._timer_record import TimerRecord, decode_record

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._ids import FacetAddress
    from ..storage import CommitBatch, FacetStore, TimerIndex
    from ._layers import Layer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class HintPlan:
    """Index work around one facet commit; ``due_ms`` is the earliest timer after it."""

    due_ms: int | None
    lower: bool
    settle: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class HintResult:
    """The hint the index holds after the commit job (``known`` False: a settle failed)."""

    hint_ms: int | None
    known: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerSummary:
    count: int
    failed: list[str]
    failed_count: int
    next_due_ms: int | None


@final
class TimerState:
    """Timers of one activation; load with :meth:`load`."""

    def __init__(self) -> None:
        self.durable: dict[str, tuple[int, bool]] = {}
        self._heap: list[tuple[int, str]] = []
        self.hint_ms: int | None = None
        self.hint_known = False
        # Set by a wake-up: the next commit checks the hint even without timer writes.
        self.resync = False

    @classmethod
    def load(cls, store: FacetStore) -> TimerState:
        """Read every timer of ``store`` (bounded by ``timers_per_facet_max``)."""
        state = cls()
        iterator = store.iterate(low=None, high=None, reverse=False, db=TIMERS_DB)
        with contextlib.closing(iterator):
            for key, raw in iterator:
                record = decode_record(raw)
                state._put(key.decode(), record)
        return state

    # -- the committed view -----------------------------------------------------------------

    def _put(self, name: str, record: TimerRecord | None) -> None:
        if record is None:
            self.durable.pop(name, None)
            return
        self.durable[name] = (record.due_ms, record.failed)
        if not record.failed:
            heapq.heappush(self._heap, (record.due_ms, name))

    def apply(self, timers: dict[str, TimerRecord | None]) -> None:
        for name, record in timers.items():
            self._put(name, record)
        if len(self._heap) > 2 * len(self.durable) + 64:
            self._heap = [(due, name) for name, (due, failed) in self.durable.items() if not failed]
            heapq.heapify(self._heap)

    def _is_current(self, due_ms: int, name: str) -> bool:
        return self.durable.get(name) == (due_ms, False)

    def earliest_ms(self) -> int | None:
        heap = self._heap
        while heap and not self._is_current(*heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due_names(self, now_ms: int, limit: int) -> list[str]:
        """Names of committed timers due at ``now_ms``, earliest first, at most ``limit``.

        They stay in the heap: each leaves it (lazily, as a stale entry) only once the write
        that delivers, retries, moves or cancels it is applied by :meth:`plan`. Until then the
        store holds it, so a commit planned while it is being delivered (one started when
        ``on_timer`` suspends) keeps the hint at or before it, and a delivery cut short (the
        activation cancelled at shutdown) leaves it scheduled.
        """
        heap = self._heap
        taken: list[tuple[int, str]] = []
        names: list[str] = []
        while len(names) < limit and (due_ms := self.earliest_ms()) is not None:
            if due_ms > now_ms:
                break
            entry = heapq.heappop(heap)
            taken.append(entry)
            if entry[1] not in names[-1:]:  # a name set twice to one due time: pushed twice
                names.append(entry[1])
        for entry in taken:
            heapq.heappush(heap, entry)
        return names

    # -- the hint ---------------------------------------------------------------------------

    def plan(self, layer: Layer) -> HintPlan | None:
        """Apply ``layer``'s timer writes (it is becoming the commit in flight) and say what
        the index needs around that commit; None when nothing."""
        if layer.timers is not None:
            self.apply(layer.timers)
        elif not self.resync:
            return None
        self.resync = False
        due_ms = self.earliest_ms()
        if not self.hint_known:
            return HintPlan(due_ms=due_ms, lower=due_ms is not None, settle=True)
        if due_ms == self.hint_ms:
            return None
        if due_ms is not None and (self.hint_ms is None or due_ms < self.hint_ms):
            return HintPlan(due_ms=due_ms, lower=True, settle=False)
        return HintPlan(due_ms=due_ms, lower=False, settle=True)

    def planned(self, result: HintResult) -> None:
        self.hint_ms = result.hint_ms
        self.hint_known = result.known

    # -- the visible view (committed + pending layers) --------------------------------------

    def overlay(self, layers: Sequence[Layer]) -> dict[str, TimerRecord | None]:
        """Timer writes of ``layers`` not yet applied here, topmost first per name."""
        found: dict[str, TimerRecord | None] = {}
        for layer in reversed(layers):
            if layer.timers is not None:
                for name, record in layer.timers.items():
                    found.setdefault(name, record)
        return found

    def pending_writes(self, layers: Sequence[Layer]) -> int:
        return sum(len(layer.timers) for layer in layers if layer.timers is not None)

    def count(self, layers: Sequence[Layer]) -> int:
        """How many timers (scheduled or failed) the facet has, pending writes included."""
        if not self.pending_writes(layers):
            return len(self.durable)
        delta = 0
        for name, record in self.overlay(layers).items():
            delta += (record is not None) - (name in self.durable)
        return len(self.durable) + delta

    def record(self, store: FacetStore, layers: Sequence[Layer], name: str) -> TimerRecord | None:
        """Timer ``name`` as the running message sees it, or None."""
        found = lookup_timer(layers, name)
        if found is not MISSING:
            assert found is None or isinstance(found, TimerRecord)
            return found
        if name not in self.durable:
            return None
        raw = store.get(name.encode(), TIMERS_DB)
        assert raw is not None, f"timer {name!r} is in the state but not in the store"
        return decode_record(raw)

    def visible(self, layers: Sequence[Layer]) -> dict[str, tuple[int, bool]]:
        view = dict(self.durable)
        for name, record in self.overlay(layers).items():
            if record is None:
                view.pop(name, None)
            else:
                view[name] = (record.due_ms, record.failed)
        return view

    def summary(self, layers: Sequence[Layer], *, names_max: int) -> TimerSummary:
        view = self.visible(layers)
        failed = sorted(name for name, (_, is_failed) in view.items() if is_failed)
        scheduled = [due for due, is_failed in view.values() if not is_failed]
        return TimerSummary(
            count=len(view),
            failed=failed[:names_max],
            failed_count=len(failed),
            next_due_ms=min(scheduled, default=None),
        )


def commit_with_hints(
    index: TimerIndex,
    address: FacetAddress,
    plan: HintPlan,
    store: FacetStore,
    batch: CommitBatch,
) -> HintResult:
    """The commit job of a facet whose timers changed (writer thread).

    Order is the crash-safety argument (docs/decisions/0007-timers.md): lower the hint durably
    *before* the facet commit, settle it only *after*. A failed lower raises before anything is
    committed; a failed settle leaves the old, earlier hint (a spurious wake-up at worst).

    Raises:
        StorageError: the index could not be lowered, or the facet commit failed.
    """
    hint: int | None = None
    known = False
    if plan.lower:
        assert plan.due_ms is not None
        hint = index.lower(address, plan.due_ms)
        known = True
    if not batch.is_empty():
        store.commit(batch)
    if plan.settle and not (known and hint == plan.due_ms):
        try:
            index.settle(address, plan.due_ms)
        except StorageError as exc:
            logger.warning("settling the timer hint of %s failed (harmless): %s", address, exc)
            return HintResult(hint_ms=hint, known=False)
        return HintResult(hint_ms=plan.due_ms, known=True)
    return HintResult(hint_ms=hint, known=known)
