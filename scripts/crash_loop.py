"""Crash loop: SIGKILL the embedded runtime hundreds of times; nothing acknowledged may be lost.

    .venv/bin/python scripts/crash_loop.py --cycles 300 [--seed N] [--dir D]
    .venv/bin/python scripts/crash_loop.py --timers --cycles 100 [--seed N] [--dir D]

Each cycle is the one of ``tests/crash/test_crash_safety.py``: a child process drives concurrent
durable increments on Counter facets, is killed with SIGKILL at a random moment, and the parent
verifies every LMDB file and checks every counter against the child's acknowledgement log. State
accumulates in one data directory across cycles (and across runs given the same ``--dir``).

With ``--timers`` the cycles are those of ``tests/crash/test_timer_crash.py`` instead: a child
keeps setting short timers on ``Alarm`` facets; after each kill every acknowledged timer must
fire exactly once and no timer may stay pending (``tests/crash/timers.py``).

With ``--daemon`` the cycles are those of ``tests/crash/test_daemon_crash.py``: a real
``facetrt serve`` under load from ``--processes`` client processes is killed with SIGKILL and
restarted on the same data directory; after each kill every LMDB environment verifies, after each
restart every acknowledged write is read back, and at the end the register and counter history
of the whole run must be linearizable (``tests/crash/daemon.py``).

    .venv/bin/python scripts/crash_loop.py --daemon --cycles 200 [--processes 4] [--seed N]

Prints progress, then one summary line; exits 1 at the first cycle with a problem, keeping the
directory for inspection.
"""

from __future__ import annotations

import argparse
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.crash import CrashConfig, CrashHarness  # noqa: E402
from tests.crash.daemon import DaemonCrashConfig, DaemonCrashHarness  # noqa: E402
from tests.crash.timers import TimerCrashHarness  # noqa: E402
from tests.lin.checker import Verdict  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable


class _Report(Protocol):
    """What every kind of cycle reports."""

    @property
    def cycle(self) -> int: ...

    @property
    def kill_after_seconds(self) -> float: ...

    @property
    def problems(self) -> list[str]: ...


ReportT = TypeVar("ReportT", bound=_Report)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a temporary one)"
    )
    parser.add_argument("--facets", type=int, default=CrashConfig().facets)
    parser.add_argument("--progress-every", type=int, default=10, help="cycles per progress line")
    parser.add_argument("--timers", action="store_true", help="the timer crash cycles")
    parser.add_argument("--daemon", action="store_true", help="the daemon crash cycles")
    parser.add_argument(
        "--processes", type=int, default=DaemonCrashConfig().processes, help="--daemon clients"
    )
    options = parser.parse_args()
    options.seed = options.seed if options.seed is not None else secrets.randbits(32)
    loop = timer_loop if options.timers else daemon_loop if options.daemon else counter_loop
    prefix = "timer" if options.timers else "daemon" if options.daemon else "counter"
    work_dir = options.dir or Path(tempfile.mkdtemp(prefix=f"facetrt-{prefix}-crash-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"{prefix} crash loop: seed {options.seed}, work dir {work_dir}", flush=True)
    if not loop(options, work_dir):
        print(f"work dir kept for inspection: {work_dir}")
        return 1
    if options.dir is None:
        shutil.rmtree(work_dir)
    return 0


def run_cycles(
    options: argparse.Namespace,
    run_cycle: Callable[[], ReportT],
    progress: Callable[[ReportT, list[ReportT]], str],
) -> tuple[list[ReportT], bool]:
    """Run ``--cycles`` cycles, printing progress; stop at the first with a problem.

    Returns the reports and whether every cycle passed.
    """
    started = time.perf_counter()
    reports: list[ReportT] = []
    for number in range(1, options.cycles + 1):
        report = run_cycle()
        reports.append(report)
        if report.problems:
            print(f"cycle {report.cycle} FAILED (killed after {report.kill_after_seconds:.3f} s):")
            for problem in report.problems:
                print(f"  {problem}")
            return reports, False
        if number % options.progress_every == 0 or number == options.cycles:
            print(
                f"cycle {number}/{options.cycles}: {progress(report, reports)}, "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
    return reports, True


def counter_loop(options: argparse.Namespace, work_dir: Path) -> bool:
    """Kill a child incrementing counters on the embedded runtime."""
    started = time.perf_counter()
    config = CrashConfig(facets=options.facets)
    harness = CrashHarness(work_dir, random.Random(options.seed), config)
    reports, passed = run_cycles(
        options,
        harness.run_cycle,
        lambda report, reports: (
            f"+{report.acknowledged} acknowledged (killed after "
            f"{report.kill_after_seconds:.3f} s, {report.tasks} tasks/facet), total "
            f"{sum(r.acknowledged for r in reports)}, counters sum {sum(harness.values.values())}"
        ),
    )
    stores, problems = harness.verify_all()
    for problem in problems:
        print(f"final verification: {problem}")
    print(
        f"crash loop summary: {len(reports)} cycles, "
        f"{sum(r.acknowledged for r in reports)} acknowledged increments, "
        f"{sum(r.lost for r in reports)} acknowledged writes lost, "
        f"{sum(r.verified for r in reports)} environments verified after kills and {stores} at "
        f"the end, {time.perf_counter() - started:.1f} s elapsed (seed {options.seed})"
    )
    return passed and not problems


def timer_loop(options: argparse.Namespace, work_dir: Path) -> bool:
    """``--timers``: kill a child setting and firing timers; every timer must fire."""
    started = time.perf_counter()
    harness = TimerCrashHarness(work_dir, random.Random(options.seed))
    reports, passed = run_cycles(
        options,
        harness.run_cycle,
        lambda report, reports: (
            f"{report.acknowledged} acknowledged, {report.fired} fired (killed after "
            f"{report.kill_after_seconds:.3f} s), total {sum(r.acknowledged for r in reports)} "
            f"acknowledged / {sum(r.fired for r in reports)} fired"
        ),
    )
    if passed:
        print(
            f"timer crash loop summary: {len(reports)} cycles, "
            f"{sum(r.acknowledged for r in reports)} acknowledged timers, "
            f"{sum(r.fired for r in reports)} fired after kills and restarts, none lost, "
            f"{time.perf_counter() - started:.1f} s elapsed (seed {options.seed})"
        )
    return passed


def daemon_loop(options: argparse.Namespace, work_dir: Path) -> bool:
    """``--daemon``: kill a daemon under client load; nothing acknowledged may be lost."""
    started = time.perf_counter()
    config = DaemonCrashConfig(processes=options.processes)
    with DaemonCrashHarness(work_dir, random.Random(options.seed), config) as harness:
        reports, passed = run_cycles(
            options,
            harness.run_cycle,
            lambda report, reports: (
                f"+{report.acknowledged} acknowledged of {report.calls} calls ({report.unknown} "
                f"unknown; killed after {report.kill_after_seconds:.3f} s), "
                f"{report.environments} environments verified; total "
                f"{sum(r.acknowledged for r in reports)} acknowledged"
            ),
        )
        if not passed:
            return False
        summary = harness.finish()
    for problem in summary.problems:
        print(f"final check: {problem}")
    print(f"linearizability of the whole history: {summary.linearizability}")
    print(
        f"daemon crash loop summary: {len(reports)} cycles with {options.processes} client "
        f"processes, {sum(r.calls for r in reports)} calls "
        f"({sum(r.acknowledged for r in reports)} acknowledged writes, "
        f"{sum(r.unknown for r in reports)} unknown outcomes), "
        f"{sum(r.lost for r in reports) + summary.lost} acknowledged writes lost, "
        f"{sum(r.environments for r in reports)} environments verified after kills and "
        f"{summary.environments} at the end, {summary.timers_fired} timers fired, "
        f"{time.perf_counter() - started:.1f} s elapsed (seed {options.seed})"
    )
    return not summary.problems and summary.linearizability.verdict is Verdict.LINEARIZABLE


if __name__ == "__main__":
    sys.exit(main())
