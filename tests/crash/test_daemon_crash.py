"""Daemon crash loop: SIGKILL ``facetrt serve`` under load; nothing acknowledged may be lost.

A few cycles of ``tests/crash/daemon.py`` (several client processes, a real daemon on loopback,
SIGKILL at random moments, every LMDB environment verified after each kill, every acknowledged
write checked after each restart, then the linearizability of the whole history across the
kills). ``FACETRT_CRASH_SEED`` replays a run's random choices (not its schedule);
``scripts/crash_loop.py --daemon`` runs hundreds of cycles.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import TYPE_CHECKING

import pytest

from facetrt import FacetAddress
from tests.crash import DATA_FILE
from tests.crash.daemon import DaemonCrashConfig, DaemonCrashHarness
from tests.lin.checker import Verdict
from tests.lin.recorder import TENANT

if TYPE_CHECKING:
    from pathlib import Path

CYCLES = 4


@pytest.mark.slow
def test_acknowledged_writes_survive_daemon_sigkills(tmp_path: Path) -> None:
    seed = int(os.environ.get("FACETRT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    context = f"seed {seed} (FACETRT_CRASH_SEED={seed} replays its choices), work dir {tmp_path}"
    config = DaemonCrashConfig(processes=3, kill_after_min_seconds=0.2)
    with DaemonCrashHarness(tmp_path, random.Random(seed), config) as harness:
        reports = [harness.run_cycle() for _ in range(CYCLES)]
        summary = harness.finish()

    problems = [f"cycle {r.cycle}: {problem}" for r in reports for problem in r.problems]
    problems += summary.problems
    assert not problems, f"{context}:\n" + "\n".join(problems)
    assert sum(r.lost for r in reports) + summary.lost == 0, context
    # The run did what it claims: writes were acknowledged and checked after kills, calls were
    # cut short, every kind of environment was verified.
    assert sum(r.acknowledged for r in reports) > 0, context
    assert sum(r.unknown for r in reports) > 0, context
    assert all(r.environments > 0 for r in reports), context
    assert summary.timers_fired > 0, context
    lin = summary.linearizability
    assert lin.verdict is Verdict.LINEARIZABLE, f"{context}\n{lin}"
    assert lin.unknown > 0, context


@pytest.mark.slow
def test_daemon_crash_checks_find_a_lost_write(tmp_path: Path) -> None:
    """The checks can fail: a store put back as it was one cycle earlier (acknowledged
    increments lost, as a broken fsync would lose them) is reported as lost writes after the
    restart, and the history is no longer linearizable."""
    seed = int(os.environ.get("FACETRT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    context = f"seed {seed}, work dir {tmp_path}"
    # Only counter calls on one facet, killed late enough that each cycle acknowledges some.
    config = DaemonCrashConfig(
        processes=2,
        register_facets=0,
        counter_facets=1,
        append_fraction=0,
        timer_fraction=0,
        fresh_fraction=0,
        short_deadline_fraction=0,
        drop_fraction=0,
        kill_after_min_seconds=1.0,
        kill_after_max_seconds=1.5,
    )
    saved = tmp_path / "saved.mdb"

    def save(data_dir: Path) -> None:
        shutil.copyfile(_store(data_dir, "ctr-0"), saved)

    def put_back(data_dir: Path) -> None:
        shutil.copyfile(saved, _store(data_dir, "ctr-0"))

    with DaemonCrashHarness(tmp_path, random.Random(seed), config) as harness:
        first = harness.run_cycle(after_kill=save)
        second = harness.run_cycle(after_kill=put_back)
        summary = harness.finish()

    assert not first.problems, f"{context}: {first.problems}"
    assert second.acknowledged > 0, context
    assert second.lost > 0, f"{context}: {second}"
    assert any("ctr-0" in problem for problem in second.problems), context
    assert summary.linearizability.verdict is Verdict.NOT_LINEARIZABLE, context


def _store(data_dir: Path, agent: str) -> Path:
    return data_dir / FacetAddress(TENANT, agent).relative_path() / DATA_FILE
