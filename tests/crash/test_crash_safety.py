"""Crash safety: SIGKILL a runtime mid-write; nothing acknowledged may be lost.

Each cycle starts a child process that drives concurrent durable increments, kills it at a
random moment and checks the data directory (see ``tests/crash/__init__.py``). Set
``FACETRT_CRASH_SEED`` to replay the random choices of a failed run; ``scripts/crash_loop.py``
runs the same cycles hundreds of times.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import pytest

from tests.crash import CrashHarness

if TYPE_CHECKING:
    from pathlib import Path

CYCLES = 5


@pytest.mark.slow
def test_acknowledged_increments_survive_sigkill(tmp_path: Path) -> None:
    seed = int(os.environ.get("FACETRT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    harness = CrashHarness(tmp_path, random.Random(seed))
    reports = [harness.run_cycle() for _ in range(CYCLES)]

    context = (
        f"seed {seed} (FACETRT_CRASH_SEED={seed} replays its random choices), work dir {tmp_path}"
    )
    problems = [
        f"cycle {report.cycle}: {problem}" for report in reports for problem in report.problems
    ]
    assert not problems, f"{context}:\n" + "\n".join(problems)
    assert sum(report.lost for report in reports) == 0, context
    assert sum(report.acknowledged for report in reports) > 0, f"{context}: nothing acknowledged"
    assert sum(report.verified for report in reports) > 0, f"{context}: nothing verified"
    # State accumulates: the counters read at the end cover every acknowledged increment.
    assert sum(harness.values.values()) >= sum(report.acknowledged for report in reports), context
    stores, problems = harness.verify_all()
    assert not problems, f"{context}:\n" + "\n".join(problems)
    assert stores >= 1, context
