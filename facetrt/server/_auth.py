"""AuthThrottle: slows down peers that keep failing to authenticate.

After ``failures_free`` failures from one peer address, each further failure waits
``0.1 * 2**(n - failures_free)`` seconds (at most ``delay_seconds_max``) before its answer, so
guessing keys costs time while a mistyped key costs nothing. A success resets the count. The
table is bounded (least recently failing peers are forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, final

import trio

PEERS_MAX: Final = 10_000


@final
class AuthThrottle:
    def __init__(self, *, failures_free: int, delay_seconds_max: float) -> None:
        self._failures_free = failures_free
        self._delay_seconds_max = delay_seconds_max
        self._failures: OrderedDict[str, int] = OrderedDict()

    def delay_for(self, peer: str) -> float:
        excess = self._failures.get(peer, 0) - self._failures_free
        if excess <= 0:
            return 0.0
        return float(min(self._delay_seconds_max, 0.1 * 2 ** min(excess, 30)))

    async def failed(self, peer: str) -> None:
        """Record a failure of ``peer`` and wait the delay it has earned."""
        self._failures[peer] = self._failures.get(peer, 0) + 1
        self._failures.move_to_end(peer)
        while len(self._failures) > PEERS_MAX:
            self._failures.popitem(last=False)
        await trio.sleep(self.delay_for(peer))

    def succeeded(self, peer: str) -> None:
        self._failures.pop(peer, None)
