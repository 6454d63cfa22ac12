"""The timer crash-test child: set short timers on a few facets until SIGKILL.

    python -m tests.crash.timer_child DATA_DIR LOG_PATH [--facets N] [--open-max N]
        [--delay-max S] [--max-seconds S]

Opens the embedded runtime on DATA_DIR (at most ``--open-max`` facets open, so the others
passivate and are woken by their timers), writes ``running`` to stdout, then runs one loop per
``Alarm`` facet: append ``s <agent> <name>`` to LOG_PATH, call ``set(name, after_seconds=d)``
with ``d`` random in ``[0, --delay-max]``, append ``a <agent> <name>`` after the reply. Timers
fire while it runs, so kills land in sets, in deliveries and in their index updates alike. As
in ``child.py``, records are ``os.write`` calls on an ``O_APPEND`` descriptor, without fsync.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
from pathlib import Path

import trio

from facetrt import RuntimeConfig, open_runtime
from tests.crash import READY_LINE, TENANT
from tests.crash.timers import TIMER_CLASSES, timer_agent_ids

ORPHAN_POLL_SECONDS = 0.25


async def drive(log_fd: int, options: argparse.Namespace) -> None:
    parent = os.getppid()
    config = RuntimeConfig(commit_threads=options.facets + 1, open_facets_max=options.open_max)
    rng = random.Random()
    async with open_runtime(options.data_dir, classes=TIMER_CLASSES, config=config) as rt:

        async def setter(agent: str, prefix: str) -> None:
            for number in itertools.count():
                name = f"{prefix}{number}"
                os.write(log_fd, f"s {agent} {name}\n".encode())
                delay = rng.uniform(0, options.delay_max)
                await rt.call(TENANT, agent, "set", name, None, delay, cls="Alarm")
                os.write(log_fd, f"a {agent} {name}\n".encode())

        async def stop_when_orphaned(scope: trio.CancelScope) -> None:
            while os.getppid() == parent:
                await trio.sleep(ORPHAN_POLL_SECONDS)
            scope.cancel()

        os.write(sys.stdout.fileno(), READY_LINE)
        with trio.move_on_after(options.max_seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_orphaned, nursery.cancel_scope)
                for agent in timer_agent_ids(options.facets):
                    nursery.start_soon(setter, agent, options.prefix)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.crash.timer_child", description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("log_path", type=Path)
    parser.add_argument("--facets", type=int, default=4)
    parser.add_argument("--open-max", type=int, default=3)
    parser.add_argument("--delay-max", type=float, default=0.3)
    parser.add_argument("--prefix", default="t")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    options = parser.parse_args()
    log_fd = os.open(options.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        trio.run(drive, log_fd, options)
    finally:
        os.close(log_fd)
    sys.stdout.write("finished without being killed\n")


if __name__ == "__main__":
    main()
