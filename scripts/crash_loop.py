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
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.crash import CrashConfig, CrashHarness  # noqa: E402
from tests.crash.daemon import DaemonCrashConfig, DaemonCrashHarness  # noqa: E402
from tests.crash.timers import TimerCrashHarness  # noqa: E402
from tests.lin.checker import Verdict  # noqa: E402


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
    if options.timers:
        return timer_loop(options)
    if options.daemon:
        return daemon_loop(options)

    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    work_dir = options.dir or Path(tempfile.mkdtemp(prefix="facetrt-crash-"))
    print(f"crash loop: seed {seed}, work dir {work_dir}", flush=True)
    started = time.perf_counter()
    harness = CrashHarness(work_dir, random.Random(seed), CrashConfig(facets=options.facets))

    acknowledged = lost = verified = cycles = 0
    failed = False
    for cycles in range(1, options.cycles + 1):
        report = harness.run_cycle()
        acknowledged += report.acknowledged
        lost += report.lost
        verified += report.verified
        if report.problems:
            failed = True
            print(
                f"cycle {report.cycle} FAILED (killed after {report.kill_after_seconds:.3f} s, "
                f"{report.tasks} tasks per facet):"
            )
            for problem in report.problems:
                print(f"  {problem}")
            break
        if cycles % options.progress_every == 0 or cycles == options.cycles:
            print(
                f"cycle {cycles}/{options.cycles}: +{report.acknowledged} acknowledged "
                f"(killed after {report.kill_after_seconds:.3f} s, {report.tasks} tasks/facet), "
                f"total {acknowledged}, counters sum {sum(harness.values.values())}, "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
    stores, problems = harness.verify_all()
    for problem in problems:
        failed = True
        print(f"final verification: {problem}")
    elapsed = time.perf_counter() - started
    print(
        f"crash loop summary: {cycles} cycles, {acknowledged} acknowledged increments, "
        f"{lost} acknowledged writes lost, {verified} environments verified after kills "
        f"and {stores} at the end, {elapsed:.1f} s elapsed (seed {seed})"
    )
    if failed:
        print(f"work dir kept for inspection: {work_dir}")
        return 1
    if options.dir is None:
        shutil.rmtree(work_dir)
    return 0


def timer_loop(options: argparse.Namespace) -> int:
    """``--timers``: kill a child setting and firing timers; every timer must fire."""
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    work_dir = options.dir or Path(tempfile.mkdtemp(prefix="facetrt-timer-crash-"))
    print(f"timer crash loop: seed {seed}, work dir {work_dir}", flush=True)
    started = time.perf_counter()
    harness = TimerCrashHarness(work_dir, random.Random(seed))
    acknowledged = fired = cycles = 0
    for cycles in range(1, options.cycles + 1):
        report = harness.run_cycle()
        acknowledged += report.acknowledged
        fired += report.fired
        if report.problems:
            print(f"cycle {report.cycle} FAILED (killed after {report.kill_after_seconds:.3f} s):")
            for problem in report.problems:
                print(f"  {problem}")
            print(f"work dir kept for inspection: {work_dir}")
            return 1
        if cycles % options.progress_every == 0 or cycles == options.cycles:
            print(
                f"cycle {cycles}/{options.cycles}: {report.acknowledged} acknowledged, "
                f"{report.fired} fired (killed after {report.kill_after_seconds:.3f} s), "
                f"total {acknowledged} acknowledged / {fired} fired, "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
    print(
        f"timer crash loop summary: {cycles} cycles, {acknowledged} acknowledged timers, "
        f"{fired} fired after kills and restarts, none lost, "
        f"{time.perf_counter() - started:.1f} s elapsed (seed {seed})"
    )
    if options.dir is None:
        shutil.rmtree(work_dir)
    return 0


def daemon_loop(options: argparse.Namespace) -> int:
    """``--daemon``: kill a daemon under client load; nothing acknowledged may be lost."""
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    work_dir = options.dir or Path(tempfile.mkdtemp(prefix="facetrt-daemon-crash-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"daemon crash loop: seed {seed}, work dir {work_dir}", flush=True)
    started = time.perf_counter()
    config = DaemonCrashConfig(processes=options.processes)
    totals = {"calls": 0, "acknowledged": 0, "unknown": 0, "environments": 0, "walked": 0}
    lost = cycles = 0
    with DaemonCrashHarness(work_dir, random.Random(seed), config) as harness:
        for cycles in range(1, options.cycles + 1):
            report = harness.run_cycle()
            for name in totals:
                totals[name] += getattr(report, name)
            lost += report.lost
            if report.problems:
                print(
                    f"cycle {report.cycle} FAILED (killed after {report.kill_after_seconds:.3f} s):"
                )
                for problem in report.problems:
                    print(f"  {problem}")
                print(f"work dir kept for inspection: {work_dir}")
                return 1
            if cycles % options.progress_every == 0 or cycles == options.cycles:
                print(
                    f"cycle {cycles}/{options.cycles}: +{report.acknowledged} acknowledged of "
                    f"{report.calls} calls ({report.unknown} unknown; killed after "
                    f"{report.kill_after_seconds:.3f} s), {report.environments} environments "
                    f"({report.walked} walked); total {totals['acknowledged']} acknowledged, "
                    f"{time.perf_counter() - started:.1f} s",
                    flush=True,
                )
        summary = harness.finish()
    lost += summary.lost
    for problem in summary.problems:
        print(f"final check: {problem}")
    print(f"linearizability of the whole history: {summary.linearizability}")
    elapsed = time.perf_counter() - started
    print(
        f"daemon crash loop summary: {cycles} cycles with {options.processes} client processes, "
        f"{totals['calls']} calls ({totals['acknowledged']} acknowledged writes, "
        f"{totals['unknown']} unknown outcomes), {lost} acknowledged writes lost, "
        f"{totals['environments']} environment checks after kills ({totals['walked']} walked "
        f"by lmdb.verify) and {summary.environments} at the end, {summary.timers_fired} timers "
        f"fired, {elapsed:.1f} s elapsed (seed {seed})"
    )
    if summary.problems or summary.linearizability.verdict is not Verdict.LINEARIZABLE:
        print(f"work dir kept for inspection: {work_dir}")
        return 1
    if options.dir is None:
        shutil.rmtree(work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
