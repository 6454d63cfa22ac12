"""Replay one seed of the simulation: ``.venv/bin/python -m tests.sim --seed N``.

Prints the run's report (the seed, the replay command, the plan, what ran, the faults, every
violation) and exits 1 if an invariant broke. ``--trace`` also prints every event.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .harness import run_simulation


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--trace", action="store_true", help="print every event of the run")
    parser.add_argument(
        "--log", action="store_true", help="show the runtime's own log (errors of injected faults)"
    )
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO if options.log else logging.CRITICAL)
    result = run_simulation(options.seed)
    if options.trace:
        for event in result.history.trace:
            print(json.dumps(event))
    print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
