"""The seed's storage faults for one runtime lifetime: failed commits, slow store jobs, crashes.

Installed through the storage layer's ``StoreHooks.before_commit`` (inside the commit's write
transaction, before it commits: raising aborts it, so nothing is written) and the simulation's
store runners (``LoopStoreWorkers``: a delay before each job, and a look at each job's outcome
before the runtime gets it).

A crash happens *after* a commit: the hook arms it, and once the runner sees that commit
succeeded it calls ``on_crash`` before the runtime hears of it. From then on every commit
fails (a dead node writes nothing), so whatever the runtime does while it is torn down cannot
reach the disk; the harness records every call in flight as of unknown outcome.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

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
        on_crash: Callable[[], None],
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
        self._failure_injected = False

    def hooks(self) -> StoreHooks | None:
        return StoreHooks(before_commit=self._before_commit) if self._rates.storage_hooks else None

    def _before_commit(self, path: Path) -> None:
        if self.crashed:
            raise StorageError("the node crashed: nothing more reaches the disk")
        draw = self._rng.random()
        if draw < self._rates.commit_failure:
            self._history.fault("commit_failed")
            self._failure_injected = True
            raise StorageError("injected commit failure")
        if self._crash_allowed and draw < self._rates.commit_failure + self._rates.crash:
            self._crash_armed = True

    def delay(self) -> float:
        """Seconds (trio time) the next store job waits first: a slow disk."""
        if self._rates.slow_store_job and self._rng.random() < self._rates.slow_store_job:
            self._history.fault("slow_store_job")
            return self._rng.expovariate(1 / self._rates.slow_store_job_seconds)
        return 0.0

    def after_job(self, result: outcome.Outcome[object]) -> outcome.Outcome[object]:
        armed, self._crash_armed = self._crash_armed, False
        injected, self._failure_injected = self._failure_injected, False
        if armed and isinstance(result, outcome.Value) and not self.crashed:
            self.crashed = True
            self._on_crash()
        if injected and self._lose_failed_commits:
            return outcome.Value(None)
        return result
