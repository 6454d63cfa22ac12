"""Host the example facets on the embedded runtime and drive them: ``python -m facetrt.examples``.

Runs 64 concurrent conversations against ``./facetrt-data`` (or the directory given), then
prints what the facets remember and the runtime's commit statistics. Run it twice: the state
is durable, so the numbers grow.
"""

from __future__ import annotations

import argparse
import sys
import time

import trio

from .. import open_runtime
from . import CLASSES, STATS_AGENT

TENANT = "demo"


async def main(data_dir: str, conversations: int, turns: int) -> None:
    async with open_runtime(data_dir, classes=CLASSES) as rt:
        started = time.perf_counter()

        async def converse(index: int) -> None:
            agent = f"assistant-{index}"
            for turn in range(turns):
                role = "user" if turn % 2 == 0 else "assistant"
                await rt.call(
                    TENANT, agent, "append_turn", role, f"message {turn}", turn, cls="AgentMemory"
                )

        async with trio.open_nursery() as nursery:
            for index in range(conversations):
                nursery.start_soon(converse, index)
        elapsed = time.perf_counter() - started
        last = await rt.call(TENANT, "assistant-0", "last", 3)
        summary = await rt.call(TENANT, "assistant-0", "summary")
        total = await rt.call(TENANT, STATS_AGENT, "get")
        stats = rt.statistics()
        calls = conversations * turns
        print(
            f"{calls} turns appended by {conversations} conversations in {elapsed:.2f} s "
            f"({calls / elapsed:,.0f} calls/s, each durable before its reply)"
        )
        print(f"assistant-0 last 3 turns: {last!r}")
        print(f"assistant-0 summary: {summary!r}")
        print(f"turns recorded tenant-wide (all runs): {total!r}")
        print(
            f"commits: {stats.commits}, messages per commit: "
            f"{stats.committed_envelopes / max(1, stats.commits):.1f}"
        )


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m facetrt.examples", description=__doc__)
    parser.add_argument("data_dir", nargs="?", default="./facetrt-data")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=50)
    options = parser.parse_args()
    trio.run(main, options.data_dir, options.conversations, options.turns)
    sys.exit(0)


if __name__ == "__main__":
    run()
