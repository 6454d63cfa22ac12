"""Small test helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable


async def wait_until(predicate: Callable[[], bool], *, seconds: float = 10.0) -> None:
    """Poll ``predicate`` until it holds.

    Needed where the runtime's writer threads are involved: they run in real time, which an
    autojump clock cannot see, so "after N virtual seconds" may still be mid-close.
    """
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)
