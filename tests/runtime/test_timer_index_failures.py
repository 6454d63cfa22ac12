"""The node's timer index fails: timers are neither lost nor the node stopped.

Time is trio's autojump clock, with the runtime's wall clock derived from it and virtual time
held while writer threads work (as in ``test_timers.py``). The failures are real: a meta page
write refused by the descriptor (``tests.faults.meta_write``), after which LMDB refuses the
environment, and an index environment closed under the runtime, whose reads then fail.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from facetrt import InternalError, RuntimeConfig, open_runtime
from tests.facets import CLASSES, Alarm
from tests.faults.meta_write import failing_meta_writes
from tests.util import clock_held_during_store_jobs, trio_wall_clock

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from facetrt import Runtime

TENANT = "acme"


@pytest.fixture(autouse=True)
def _clear_deliveries() -> None:
    Alarm.deliveries.clear()


@contextlib.asynccontextmanager
async def _open(data_dir: Path) -> AsyncIterator[Runtime]:
    config = RuntimeConfig(commit_threads=2)
    async with (
        open_runtime(data_dir, classes=CLASSES, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        yield rt


async def test_failed_index_write_fails_the_call_and_the_next_timer_fires(
    autojump_clock: trio.testing.MockClock, data_dir: Path
) -> None:
    async with _open(data_dir) as rt:
        await rt.call(TENANT, "x", "set", "first", after_seconds=5, cls="Alarm")
        with failing_meta_writes(data_dir / "timers"):
            # The index must be lowered before the facet commit: that write fails, so does
            # the call (nothing of it is committed), and the facet is reset.
            with pytest.raises(InternalError, match="timer index commit failed"):
                await rt.call(TENANT, "x", "set", "lost", after_seconds=1)
            await rt.call(TENANT, "x", "set", "second", after_seconds=2)
        await Alarm.wait_deliveries(2)
        assert [name for _, name, *_ in Alarm.deliveries] == ["second", "first"]
        assert await rt.call(TENANT, "x", "list_timers") == []
        assert rt.statistics().resets == 1


async def test_unreadable_index_is_retried_and_repaired_without_stopping_the_node(
    autojump_clock: trio.testing.MockClock, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _open(data_dir) as rt:
        await rt.call(TENANT, "x", "set", "due", after_seconds=10, cls="Alarm")
        index = rt.core.timer_index
        caplog.set_level(logging.ERROR, logger="facetrt.runtime")
        index.close()  # every read fails from now on, as after a fatal LMDB error
        started = trio.current_time()
        await Alarm.wait_deliveries(1)  # the scheduler repaired the index and went on
        assert trio.current_time() - started >= 10
        # Read-only calls are answered after the commit before them: the delivery's, whose
        # job also settles (here: removes) the facet's hint.
        assert await rt.call(TENANT, "x", "fired") == {"due": 1}
        assert await rt.call(TENANT, "x", "list_timers") == []
        assert index.count() == 0
        assert await rt.call(TENANT, "y", "increment", cls="Counter") == 1
    assert "reading the timer index failed; retrying" in caplog.text
