"""A ``Counter`` whose handler takes time: the overload benchmark's slow-handler workload.

An agent facet that awaits a model or a tool is slow in wall-clock time while the node is
idle; its throughput is set by the handler, not by the node. ``BENCH_HANDLER_MS`` (read once,
in the daemon process) sets how long each ``increment`` awaits before it writes.
"""

from __future__ import annotations

import os
from typing import Final

import trio

from facetrt import rpc
from facetrt.examples import Counter

HANDLER_SECONDS: Final = float(os.environ.get("BENCH_HANDLER_MS", "1")) / 1000


class SlowCounter(Counter):
    @rpc
    async def increment(self, by: int = 1) -> int:
        await trio.sleep(HANDLER_SECONDS)  # one message at a time: this bounds the facet's rate
        return await super().increment(by)
