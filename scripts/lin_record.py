"""Linearizability recording: many client processes against a real daemon, then the checker.

    .venv/bin/python scripts/lin_record.py [--processes 16] [--operations 2000] [--restarts 0]
        [--seed N] [--dir D]

One run of ``tests/lin/recorder.py``: a fresh ``facetrt serve`` on loopback, ``--processes``
worker processes each making ``--operations`` random register (read, write, cas) and counter
(read, increment) calls with short deadlines and dropped connections mixed in, optionally
``--restarts`` SIGKILLs and restarts of the daemon during the run; then the merged history is
checked per (facet, key), each unknown outcome dropped once the daemon process that could have
run it was reaped. Prints the figures and exits 1 unless the history is linearizable, keeping
the directory (every worker's JSON-lines history, and the merged one checked, ``history.jsonl``)
for inspection.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.lin.checker import Verdict  # noqa: E402
from tests.lin.recorder import RecordOptions, check_recorded, record  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--operations", type=int, default=2000, help="per process")
    parser.add_argument("--register-facets", type=int, default=4)
    parser.add_argument("--register-keys", type=int, default=4)
    parser.add_argument("--counter-facets", type=int, default=4)
    parser.add_argument("--short-deadline-fraction", type=float, default=0.02)
    parser.add_argument("--drop-fraction", type=float, default=0.02)
    parser.add_argument("--restarts", type=int, default=0, help="daemon SIGKILLs during the run")
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=None,
        help="fresh facets this often (default: never)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a temporary one)"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    options = RecordOptions(
        seed=seed,
        processes=args.processes,
        operations=args.operations,
        register_facets=args.register_facets,
        register_keys=args.register_keys,
        counter_facets=args.counter_facets,
        short_deadline_fraction=args.short_deadline_fraction,
        drop_fraction=args.drop_fraction,
        restarts=args.restarts,
        round_seconds=args.round_seconds,
    )
    work_dir = args.dir or Path(tempfile.mkdtemp(prefix="facetrt-lin-"))
    print(f"linearizability run: seed {seed}, work dir {work_dir}", flush=True)
    recording = record(work_dir, options)
    print(
        f"recorded {len(recording.history)} operations from {options.processes} processes "
        f"in {recording.record_seconds:.1f} s, {recording.restarts} daemon restarts",
        flush=True,
    )
    report = check_recorded(recording.history)
    print(report)
    if report.verdict is not Verdict.LINEARIZABLE:
        print(f"kept {work_dir}")
        return 1
    if args.dir is None:
        shutil.rmtree(work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
