"""The crash-test child: drive durable increments until SIGKILL.

    python -m tests.crash.child DATA_DIR LOG_PATH [--facets N] [--tasks N]
        [--fresh N --fresh-prefix P --fresh-interval S] [--max-seconds S]

Opens the embedded runtime on DATA_DIR, writes ``running`` to stdout, then runs ``--tasks``
concurrent loops per facet (``--facets`` Counter facets of one tenant), each one: append a start
record to LOG_PATH, call ``increment``, append an ack record with the returned value. Meanwhile
it creates ``--fresh`` new Counter facets named ``<P>0``, ``<P>1``, ... with one increment each,
one every ``--fresh-interval`` seconds, logged the same way. It never stops by itself: the
parent kills it. If nobody does within ``--max-seconds``, or the parent dies, it closes the
runtime and exits (the parent then reports that it was not killed).

Records are written with ``os.write`` on an ``O_APPEND`` descriptor, one record per call. There
is no fsync, on purpose: a SIGKILL ends the process, not the kernel, so data that ``write`` has
put in the page cache reaches the file anyway (only a machine crash could lose it, and this
test does not simulate one). The start record is written before the call is made and the ack
record after its reply, so the log never claims more acknowledgements, or fewer starts, than
happened.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from facetrt import RuntimeConfig, open_runtime
from tests.crash import (
    CLASSES,
    READY_LINE,
    TENANT,
    ack_record,
    agent_ids,
    fresh_agent_ids,
    start_record,
)

ORPHAN_POLL_SECONDS = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    data_dir: Path
    log_path: Path
    facets: int
    tasks: int
    fresh: int
    fresh_prefix: str
    fresh_interval: float
    max_seconds: float


async def drive(log_fd: int, options: Options) -> None:
    parent = os.getppid()
    config = RuntimeConfig(commit_threads=options.facets + 1)
    async with open_runtime(options.data_dir, classes=CLASSES, config=config) as rt:

        async def increment(agent: str) -> None:
            # No fsync: SIGKILL does not lose what write() put in the page cache (see above).
            os.write(log_fd, start_record(agent))
            value = await rt.call(TENANT, agent, "increment", cls="Counter")
            assert isinstance(value, int), f"increment returned {value!r}"
            os.write(log_fd, ack_record(agent, value))

        async def increments(agent: str) -> None:
            while True:
                await increment(agent)

        async def create_fresh() -> None:
            for agent in fresh_agent_ids(options.fresh_prefix, options.fresh):
                await increment(agent)
                await trio.sleep(options.fresh_interval)

        async def stop_when_orphaned(scope: trio.CancelScope) -> None:
            while os.getppid() == parent:
                await trio.sleep(ORPHAN_POLL_SECONDS)
            scope.cancel()

        os.write(sys.stdout.fileno(), READY_LINE)
        with trio.move_on_after(options.max_seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_orphaned, nursery.cancel_scope)
                nursery.start_soon(create_fresh)
                for agent in agent_ids(options.facets):
                    for _ in range(options.tasks):
                        nursery.start_soon(increments, agent)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.crash.child", description=__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("log_path", type=Path)
    parser.add_argument("--facets", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--fresh", type=int, default=0)
    parser.add_argument("--fresh-prefix", default="fresh-")
    parser.add_argument("--fresh-interval", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    options = Options(**vars(parser.parse_args()))
    log_fd = os.open(options.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        trio.run(drive, log_fd, options)
    finally:
        os.close(log_fd)
    sys.stdout.write("finished without being killed\n")


if __name__ == "__main__":
    main()
