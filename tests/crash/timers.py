"""Timer crash safety: SIGKILL a runtime that sets and fires timers; no timer may be lost.

One cycle:

1. The child (``python -m tests.crash.timer_child``) keeps setting short timers (due 0 to
   ``delay_max`` seconds later) on a few ``Alarm`` facets, logging ``s <agent> <name>`` before
   each ``set`` and ``a <agent> <name>`` after its reply; ``on_timer`` counts each delivery in
   the facet's storage (``fired/<name>``), in the same transaction that removes the timer.
2. The parent kills it with SIGKILL after a random delay, so the kill lands anywhere: in a
   set's index write, its facet commit, a delivery, the hint settle after it, a store open.
3. The parent verifies every LMDB environment (facets and ``<data dir>/timers``), reopens the
   directory with the real clock and waits until no facet holds a timer any more.

Checks: every acknowledged timer fired exactly once (its count is 1); every timer merely
started fired at most once; and no timer is left pending (a timer in a store that never fires
is a lost timer, acknowledged or not). A duplicate wake-up is allowed and invisible here; a
duplicate *delivery* would show as a count of 2 (a delivery's writes and the timer's removal
commit together, so even at-least-once delivery counts once).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from facetrt import FacetrtError, RuntimeConfig, open_runtime
from tests.crash import TENANT, run_and_kill, verify_environments
from tests.facets import Alarm

if TYPE_CHECKING:
    import random
    from pathlib import Path

    from facetrt import Facet

TIMER_CLASSES: Final[dict[str, type[Facet]]] = {"Alarm": Alarm}
POLL_SECONDS: Final = 0.05


def timer_agent_ids(facets: int) -> list[str]:
    return [f"alarm-{index}" for index in range(facets)]


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerCrashConfig:
    facets: int = 4
    open_max: int = 3  # below ``facets``: some facets passivate and are woken by their timers
    delay_max_seconds: float = 0.3
    kill_after_min_seconds: float = 0.0
    kill_after_max_seconds: float = 0.6
    drain_seconds: float = 30.0  # after reopening, every timer must have fired by then
    ready_timeout_seconds: float = 60.0
    child_max_seconds: float = 120.0


@dataclass(slots=True, kw_only=True)
class TimerCycleReport:
    cycle: int
    kill_after_seconds: float
    started: int = 0
    acknowledged: int = 0
    fired: int = 0
    problems: list[str] = field(default_factory=list)


def read_timer_log(path: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(started, acknowledged) (agent, name) pairs; a torn last line is dropped."""
    started: set[tuple[str, str]] = set()
    acknowledged: set[tuple[str, str]] = set()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return started, acknowledged
    complete, _, _ = data.rpartition(b"\n")
    for line in complete.split(b"\n") if complete else []:
        kind, agent, name = line.decode("ascii").split(" ")
        (started if kind == "s" else acknowledged).add((agent, name))
    return started, acknowledged


async def _drain(
    data_dir: Path, agents: list[str], seconds: float
) -> tuple[dict[str, dict[str, int]], dict[str, list[str]]]:
    """Reopen, wait until no facet holds a timer; return (fired counts, still pending)."""
    config = RuntimeConfig(commit_threads=2)
    fired: dict[str, dict[str, int]] = {}
    pending: dict[str, list[str]] = {}
    async with open_runtime(data_dir, classes=TIMER_CLASSES, config=config) as rt:
        with trio.move_on_after(seconds):
            while True:
                pending = {}
                for agent in agents:
                    timers = await rt.call(TENANT, agent, "list_timers", cls="Alarm")
                    assert isinstance(timers, list)
                    if timers:
                        pending[agent] = [repr(timer) for timer in timers]
                if not pending:
                    break
                await trio.sleep(POLL_SECONDS)
        for agent in agents:
            counts = await rt.call(TENANT, agent, "fired", cls="Alarm")
            assert isinstance(counts, dict)
            fired[agent] = {name: count for name, count in counts.items() if type(count) is int}
    return fired, pending


class TimerCrashHarness:
    """Kill-and-check cycles on ``work_dir/data``; logs in ``work_dir/logs``."""

    def __init__(
        self, work_dir: Path, rng: random.Random, config: TimerCrashConfig | None = None
    ) -> None:
        self.config = config or TimerCrashConfig()
        self.data_dir = work_dir / "data"
        self.log_dir = work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.agents = timer_agent_ids(self.config.facets)
        self.cycles = 0
        self._rng = rng

    def run_cycle(self) -> TimerCycleReport:
        self.cycles += 1
        config = self.config
        report = TimerCycleReport(
            cycle=self.cycles,
            kill_after_seconds=self._rng.uniform(
                config.kill_after_min_seconds, config.kill_after_max_seconds
            ),
        )
        log_path = self.log_dir / f"timers-{report.cycle:05d}.log"
        prefix = f"c{report.cycle}-"  # timer names unique across cycles
        self._run_child(report, log_path, prefix)
        started, acknowledged = read_timer_log(log_path)
        report.started, report.acknowledged = len(started), len(acknowledged)
        report.problems += verify_environments(self.data_dir)[1]
        try:
            fired, pending = trio.run(_drain, self.data_dir, self.agents, config.drain_seconds)
        except FacetrtError as exc:
            report.problems.append(f"cannot reopen the data directory: {exc!r}")
            return report
        for agent, names in pending.items():
            report.problems.append(f"{agent}: timers never fired (lost): {names[:10]}")
        this_cycle = {
            (agent, name): count
            for agent, counts in fired.items()
            for name, count in counts.items()
            if name.startswith(prefix)
        }
        report.fired = len(this_cycle)
        for key in sorted(acknowledged):
            if this_cycle.get(key) != 1:
                report.problems.append(f"{key}: acknowledged, fired {this_cycle.get(key, 0)} times")
        for key, count in sorted(this_cycle.items()):
            if key not in started or count != 1:
                report.problems.append(f"{key}: fired {count} times, started: {key in started}")
        return report

    def _run_child(self, report: TimerCycleReport, log_path: Path, prefix: str) -> None:
        config = self.config
        command = [
            sys.executable,
            "-m",
            "tests.crash.timer_child",
            str(self.data_dir.resolve()),
            str(log_path.resolve()),
            f"--facets={config.facets}",
            f"--open-max={config.open_max}",
            f"--delay-max={config.delay_max_seconds}",
            f"--prefix={prefix}",
            f"--max-seconds={config.child_max_seconds}",
        ]
        report.problems.extend(
            run_and_kill(command, log_path, config.ready_timeout_seconds, report.kill_after_seconds)
        )
