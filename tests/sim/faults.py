"""The seed's storage faults for one runtime lifetime: failed commits, slow store jobs, crashes.

Installed through the storage layer's ``StoreHooks`` (``before_commit`` inside a facet
commit's write transaction, ``before_index_commit`` inside a write of the node's timer index,
each before it commits: raising aborts it, so nothing is written) and the simulation's store
runners (``LoopStoreWorkers``: a delay before each job, and a look at each job's outcome before
the runtime gets it).

Crashes. Most happen *after* a facet commit: the hook arms it, and once the runner sees that
job succeeded (the commit and, for a facet whose timers changed, the settle of its index hint
after it) it calls ``on_crash`` before the runtime hears of it. Others happen *before* a write:
the node dies in the facet commit (after the index was lowered for it, if it was) or in an
index write (before a lower: nothing changed; before a settle: the facet commit is durable, its
hint not yet settled), the points of decision 0007's crash argument. From then on every write
fails (a dead node writes nothing), so whatever the runtime does while it is torn down cannot
reach the disk; the harness records every call in flight as of unknown outcome.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn, final

import outcome

from facetrt import StorageError
from facetrt.testing import StoreHooks

if TYPE_CHECKING:
    import random
    from collections.abc import Callable
    from pathlib import Path

    from .history import History
    from .plan import FaultRates


@final
class StoreFaults:
    """Args:
    rng: the run's fault stream (draws happen in job order, which the seed fixes).
    rates: the plan's fault rates.
    crash_allowed: whether this lifetime may still crash (the plan's budget).
    on_crash: called once, right after the crashing commit, before its outcome is handed on.
    lose_failed_commits: a deliberately broken runtime for the checker's own tests: an
        injected commit failure is reported to the runtime as success, so it acknowledges
        writes that were never written.
    """

    def __init__(
        self,
        rng: random.Random,
        rates: FaultRates,
        history: History,
        *,
        crash_allowed: bool,
        on_crash: Callable[[str], None],
        lose_failed_commits: bool = False,
    ) -> None:
        self._rng = rng
        self._rates = rates
        self._history = history
        self._crash_allowed = crash_allowed
        self._on_crash = on_crash
        self._lose_failed_commits = lose_failed_commits
        self.crashed = False
        self._crash_armed = False
        self._died: str | None = None  # the kind of a crash in the job now running
        self._failure_injected = False

    def hooks(self) -> StoreHooks | None:
        if not self._rates.storage_hooks:
            return None
        return StoreHooks(
            before_commit=self._before_commit, before_index_commit=self._before_index_commit
        )

    def _before_commit(self, path: Path) -> None:
        if self.crashed:
            raise StorageError("the node crashed: nothing more reaches the disk")
        rates = self._rates
        draw = self._rng.random()
        if draw < rates.commit_failure:
            self._history.fault("commit_failed")
            self._failure_injected = True
            raise StorageError("injected commit failure")
        draw -= rates.commit_failure
        if self._crash_allowed and draw < rates.crash:
            self._crash_armed = True
        elif self._crash_allowed and draw < rates.crash + rates.crash_before:
            self._die("crash_before_commit")

    def _before_index_commit(self, path: Path) -> None:
        if self.crashed:
            raise StorageError("the node crashed: nothing more reaches the disk")
        rates = self._rates
        draw = self._rng.random()
        if draw < rates.index_failure:
            self._history.fault("index_write_failed")
            raise StorageError("injected timer index failure")
        if self._crash_allowed and draw < rates.index_failure + rates.crash_before:
            self._die("crash_before_index_write")

    def _die(self, kind: str) -> NoReturn:
        """The node dies now, in the middle of a store job: this write never happens."""
        self.crashed = True
        self._died = kind
        raise StorageError("the node crashed during this write")

    def delay(self) -> float:
        """Seconds (trio time) the next store job waits first: a slow disk."""
        if self._rates.slow_store_job and self._rng.random() < self._rates.slow_store_job:
            self._history.fault("slow_store_job")
            return self._rng.expovariate(1 / self._rates.slow_store_job_seconds)
        return 0.0

    def after_job(self, result: outcome.Outcome[object]) -> outcome.Outcome[object]:
        armed, self._crash_armed = self._crash_armed, False
        injected, self._failure_injected = self._failure_injected, False
        died, self._died = self._died, None
        if died is not None:
            self._on_crash(died)
        elif armed and isinstance(result, outcome.Value) and not self.crashed:
            self.crashed = True
            self._on_crash("crash_after_commit")
        if injected and self._lose_failed_commits:
            return outcome.Value(None)
        return result
