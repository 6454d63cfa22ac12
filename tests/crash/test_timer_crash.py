"""Timer crash safety: SIGKILL a runtime that sets and fires timers; none may be lost.

See ``tests/crash/timers.py``. ``FACETRT_CRASH_SEED`` replays a run's random choices;
``scripts/crash_loop.py --timers`` runs many cycles.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import pytest

from tests.crash.timers import TimerCrashHarness

if TYPE_CHECKING:
    from pathlib import Path

CYCLES = 3


@pytest.mark.slow
def test_timers_survive_sigkill_at_any_point(tmp_path: Path) -> None:
    seed = int(os.environ.get("FACETRT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    harness = TimerCrashHarness(tmp_path, random.Random(seed))
    reports = [harness.run_cycle() for _ in range(CYCLES)]
    context = f"seed {seed} (FACETRT_CRASH_SEED={seed} replays it), work dir {tmp_path}"
    problems = [f"cycle {r.cycle}: {problem}" for r in reports for problem in r.problems]
    assert not problems, f"{context}:\n" + "\n".join(problems)
    assert sum(report.acknowledged for report in reports) > 0, context
    assert sum(report.fired for report in reports) > 0, context
