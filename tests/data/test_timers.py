"""Data operations and durable timers together (decisions 0007 and 0008).

A store that a data operation installs (clone target, import, restore) carries its timers, and
the node's timer index learns of them as part of the install: its timers fire without any call
to the facet. A delete leaves no hint that could wake (or re-create) the facet.

Time is trio's autojump clock with the runtime's wall clock derived from it, and a helper task
keeps the clock still while writer threads work (see ``tests/runtime/test_timers.py``), so
"fires without a call" is observed by waiting for the delivery in virtual time: a timer that
were never indexed would make ``Alarm.wait_deliveries`` fail after 100,000 virtual seconds.
Real LMDB and real writer threads throughout.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from facetrt import BadRequestError, FacetAddress, RuntimeConfig, open_runtime
from facetrt.data import DataOperations
from tests.facets import CLASSES, Alarm
from tests.util import clock_held_during_store_jobs, trio_wall_clock, wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from facetrt import Runtime

T = "acme"
Clock = trio.testing.MockClock


@pytest.fixture(autouse=True)
def _clear_deliveries() -> None:
    Alarm.deliveries.clear()


@contextlib.asynccontextmanager
async def _open(data_dir: Path) -> AsyncIterator[tuple[Runtime, DataOperations]]:
    config = RuntimeConfig(commit_threads=2)
    async with (
        open_runtime(data_dir, classes=CLASSES, config=config, wall_clock=trio_wall_clock) as rt,
        clock_held_during_store_jobs(rt),
    ):
        ops = DataOperations(rt, system=None)
        await ops.start()
        yield rt, ops


def _hint(rt: Runtime, agent: str, tenant: str = T) -> int | None:
    return rt.core.timer_index.hint_of(FacetAddress(tenant, agent))


def _due_ms(after_seconds: float) -> int:
    return int((trio_wall_clock() + after_seconds) * 1000)


async def _export(ops: DataOperations, agent: str) -> bytes:
    async with ops.export(T, agent) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _stores(data_dir: Path) -> list[Path]:
    return list(data_dir.glob("tenants/**/data.mdb"))


def delivered(agent: str) -> list[str]:
    return [name for who, name, *_ in Alarm.deliveries if who == agent]


async def test_a_cloned_facet_s_timer_fires_without_a_call(
    autojump_clock: Clock, data_dir: Path
) -> None:
    async with _open(data_dir) as (rt, ops):
        await rt.call(T, "src", "set_many", {"ping": 1000.0}, cls="Alarm")
        await ops.clone(T, "src", T, "dst", force=False)
        hint = _hint(rt, "dst")
        assert hint is not None
        assert hint <= _due_ms(1000)
        await Alarm.wait_deliveries(2)
        assert sorted(who for who, *_ in Alarm.deliveries) == ["dst", "src"]
        assert await rt.call(T, "dst", "fired") == {"ping": 1}
        assert _hint(rt, "dst") is None  # settled by the delivery's commit


async def test_export_carries_timers_and_import_restores_them(
    autojump_clock: Clock, data_dir: Path
) -> None:
    async with _open(data_dir) as (rt, ops):
        await rt.call(T, "src", "set_many", {"a": 1000.0, "b": 2000.0}, cls="Alarm")
        data = await _export(ops, "src")
        timer_lines = [
            line for line in map(json.loads, data.splitlines()) if line.get("db") == "timers"
        ]
        assert [line["key"] for line in timer_lines] == ["a", "b"]
        await rt.call(T, "src", "cancel", "a")
        await rt.call(T, "src", "cancel", "b")

        await ops.import_facet(T, "copy", _chunks(data), force=False)
        page, _ = await ops.list_facets(T, cursor=None, limit=10)
        assert {row["agent"]: row["timers"] for row in page}["copy"] == 2
        await Alarm.wait_deliveries(2)  # no call to "copy": the scheduler alone wakes it
        assert delivered("copy") == ["a", "b"]
        assert await rt.call(T, "copy", "fired") == {"a": 1, "b": 1}


async def test_import_refuses_a_malformed_timer_and_installs_nothing(
    autojump_clock: Clock, data_dir: Path
) -> None:
    async with _open(data_dir) as (rt, ops):
        await rt.call(T, "src", "set", "t", None, 1000.0, cls="Alarm")
        data = await _export(ops, "src")
        lines = [json.loads(line) for line in data.splitlines()]
        for line in lines:
            if line.get("db") == "timers":
                line.pop("value", None)
                line.pop("raw", None)
                line["value"] = [1, 2, 3]  # not a timer record
        bad = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        with pytest.raises(BadRequestError, match="timer"):
            await ops.import_facet(T, "copy", _chunks(bad), force=False)
        assert not rt.core.registry.exists(FacetAddress(T, "copy"))
        assert _hint(rt, "copy") is None


async def test_a_restored_facet_s_timer_fires_without_a_call(
    autojump_clock: Clock, data_dir: Path, tmp_path: Path
) -> None:
    async with _open(data_dir) as (rt, ops):
        await rt.call(T, "x", "set_many", {"later": 5000.0}, cls="Alarm")
        await ops.backup(tmp_path / "backup", tenant=T)
        await ops.delete_facet(T, "x")
        assert _hint(rt, "x") is None
        await ops.restore(tmp_path / "backup")
        hint = _hint(rt, "x")
        assert hint is not None
        assert hint <= _due_ms(5000)
        activations = rt.statistics().activations
        await Alarm.wait_deliveries(1)
        assert delivered("x") == ["later"]
        assert rt.statistics().activations == activations + 1  # woken by its timer only

    # Into a fresh data directory (another node): its index starts empty.
    Alarm.deliveries.clear()
    async with _open(tmp_path / "fresh") as (rt, ops):
        await ops.restore(tmp_path / "backup")
        await Alarm.wait_deliveries(1)
        assert delivered("x") == ["later"]


async def test_delete_removes_the_hint_and_a_stale_hint_creates_no_store(
    autojump_clock: Clock, data_dir: Path
) -> None:
    async with _open(data_dir) as (rt, ops):
        await rt.call(T, "gone", "set", "t", None, 1000.0, cls="Alarm")
        await rt.call(T, "f1", "set", "t", None, 1000.0, cls="Alarm")
        await rt.call(T, "f2", "set", "t", None, 1000.0, cls="Alarm")
        assert _hint(rt, "gone") is not None
        await ops.delete_facet(T, "gone")
        assert _hint(rt, "gone") is None
        await ops.delete_tenant(T)
        assert rt.core.timer_index.count() == 0
        await trio.sleep(5000)
        assert Alarm.deliveries == []
        assert rt.statistics().activations == 3  # the three calls above, nothing since
        assert _stores(data_dir) == []

    # A hint that outlived its store (files removed by hand): the scheduler's wake finds no
    # store, removes the hint and creates nothing.
    async with _open(data_dir) as (rt, _):
        await rt.call(T, "stale", "set", "t", None, 1000.0, cls="Alarm")
        path = rt.core.registry.path_of(FacetAddress(T, "stale"))
    shutil.rmtree(path)
    async with _open(data_dir) as (rt, _):
        await trio.sleep(5000)
        await wait_until(lambda: rt.statistics().timer_hints_removed == 1, seconds=100)
        assert rt.statistics().activations == 0
        assert not path.exists()
        assert rt.core.timer_index.count() == 0


async def test_restore_over_a_facet_with_timers_leaves_the_exact_hint(
    autojump_clock: Clock, data_dir: Path, tmp_path: Path
) -> None:
    """A forced restore replaces the timers too: the old, earlier timer does not fire, and
    the hint is the restored store's earliest (settled under the hold, not just lowered)."""
    async with _open(data_dir) as (rt, ops):
        await rt.call(T, "x", "set", "late", None, 9000.0, cls="Alarm")
        await ops.backup(tmp_path / "backup", tenant=T, agent="x")
        await rt.call(T, "x", "set", "early", None, 1000.0)
        await ops.restore(tmp_path / "backup", force=True)
        late = await rt.call(T, "x", "get", "late")
        assert isinstance(late, dict)
        assert _hint(rt, "x") == round(float(str(late["at"])) * 1000)
        await Alarm.wait_deliveries(1)
        assert delivered("x") == ["late"]
