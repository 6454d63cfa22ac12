"""Run many seeds of the seeded simulation (tests/sim) and report what they covered.

    .venv/bin/python scripts/sim_run.py --seeds 10000 [--start N] [--jobs 2]

Each seed is one whole run (``tests/sim/harness.py``): a workload of counter increments,
register writes and reads, facet-to-facet forwards, calls that raise, idempotent calls and
their repeats, timers set, replaced, cancelled and listed (in most seeds), from embedded callers
and protocol sessions, under seeded faults (failed and slow commits, failed timer index writes,
crashes before and after commits and index writes, graceful restarts, slow handlers, dropped
connections, cancelled calls, deadlines, passivation under tight limits), data operations
(delete, clone, export then import, backup, restore) in most seeds, then the checker.
Prints progress, then totals: seeds run, operations and attempts, outcomes, faults injected by
kind, runtime counters, what the timers did, the data operations by kind and outcome,
acknowledged writes and how many were lost (must be
0), and the replay command of every failing seed. Exits 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.sim.harness import run_simulation  # noqa: E402

SEED_SECONDS_MAX = 300  # real time: a seed still running by then is reported as hung


class _Hung(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hung(f"no result after {SEED_SECONDS_MAX} s of real time")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Summary:
    """One seed's figures, in plain values (it crosses a process boundary)."""

    seed: int
    ok: bool
    report: str = ""
    operations: int = 0
    attempts: int = 0
    epochs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    runtime: dict[str, int] = field(default_factory=dict)
    acknowledged_writes: int = 0
    lost_writes: int = 0
    timers: dict[str, int] = field(default_factory=dict)
    data: dict[str, int] = field(default_factory=dict)


def _run(seed: int) -> _Summary:
    logging.disable(logging.CRITICAL)  # injected faults make the runtime log errors
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SEED_SECONDS_MAX)
    try:
        result = run_simulation(seed)
    except BaseException as exc:  # noqa: BLE001 - a crashed or hung seed is a finding
        return _Summary(seed=seed, ok=False, report=f"seed {seed} raised {exc!r}")
    finally:
        signal.alarm(0)
    outcomes: Counter[str] = Counter()
    for operation in result.history.operations.values():
        for attempt in operation.attempts:
            status = attempt.status.value if attempt.status else "in flight"
            outcomes[status] += 1
            if attempt.code or attempt.reason:
                outcomes[f"{status} {attempt.code or attempt.reason}"] += 1
    data: Counter[str] = Counter()
    data["seeds with data operations"] = int(bool(result.plan.data_ops))
    for data_op in result.history.data_ops:
        status = data_op.status.value if data_op.status else "in flight"
        data[f"{data_op.spec.kind} {status}{'/' + data_op.code if data_op.code else ''}"] += 1
    return _Summary(
        seed=seed,
        ok=result.ok,
        data=dict(data),
        report="" if result.ok else result.report(),
        operations=len(result.history.operations),
        attempts=result.attempts(),
        epochs=result.epochs,
        outcomes=dict(outcomes),
        faults=dict(result.history.faults),
        runtime=dict(result.statistics),
        acknowledged_writes=result.check.acknowledged_writes,
        lost_writes=result.check.lost_writes,
        timers={
            "seeds with timers": int(result.plan.timers),
            **dataclasses.asdict(result.check.timers),
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--jobs", type=int, default=2, help="processes")
    parser.add_argument("--progress-every", type=int, default=500, help="seeds per line")
    options = parser.parse_args()
    seeds = range(options.start, options.start + options.seeds)
    totals: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    runtime: Counter[str] = Counter()
    timers: Counter[str] = Counter()
    data: Counter[str] = Counter()
    failures: list[_Summary] = []
    started = time.monotonic()
    load_before = os.getloadavg()
    with multiprocessing.Pool(options.jobs) as pool:
        for done, summary in enumerate(pool.imap_unordered(_run, seeds, chunksize=4), 1):
            if not summary.ok:
                failures.append(summary)
                print(summary.report, flush=True)
            totals.update(
                operations=summary.operations,
                attempts=summary.attempts,
                epochs=summary.epochs,
                acknowledged_writes=summary.acknowledged_writes,
                lost_writes=summary.lost_writes,
            )
            faults.update(summary.faults)
            outcomes.update(summary.outcomes)
            runtime.update(summary.runtime)
            timers.update(summary.timers)
            data.update(summary.data)
            if done % options.progress_every == 0:
                print(
                    f"{done}/{len(seeds)} seeds, {len(failures)} failed, "
                    f"{time.monotonic() - started:.0f} s",
                    flush=True,
                )
    elapsed = time.monotonic() - started
    print(
        f"seeds {options.start}..{options.start + options.seeds - 1}: {len(seeds)} run, "
        f"{len(failures)} failed, in {elapsed:.0f} s with {options.jobs} processes "
        f"(load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f})"
    )
    print(
        f"operations {totals['operations']}, attempts {totals['attempts']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}), runtime "
        f"lifetimes {totals['epochs']}"
    )
    print(f"faults injected: {', '.join(f'{k} {v}' for k, v in sorted(faults.items()))}")
    print(f"runtime: {', '.join(f'{k} {v}' for k, v in sorted(runtime.items()))}")
    print(f"timers: {', '.join(f'{k} {v}' for k, v in timers.items())}")
    print(f"data operations: {', '.join(f'{k} {v}' for k, v in sorted(data.items()))}")
    print(f"acknowledged writes {totals['acknowledged_writes']}, lost {totals['lost_writes']}")
    for failure in failures:
        print(f"FAILED seed {failure.seed}: .venv/bin/python -m tests.sim --seed {failure.seed}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
