from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facetrt import Runtime


async def test_counter_increments_durably(rt: Runtime) -> None:
    assert await rt.call("t1", "c", "increment", cls="Counter") == 1
    assert await rt.call("t1", "c", "increment", 5, cls="Counter") == 6
    assert await rt.call("t1", "c", "get") == 6
