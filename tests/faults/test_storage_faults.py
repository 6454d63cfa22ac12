"""Failed fdatasync, fsync, pwrite and writev in the running daemon (libfiu's ``fiu-run``).

Goal: a storage failure costs the callers of the failed commit a retryable ``internal``, resets
only the facet it hit, keeps nothing of the failed write and loses nothing acknowledged; the
node keeps serving every other facet, ``/healthz`` stays up, and after the faults stop (and
after a restart) every acknowledged write is there and every LMDB environment verifies.

Method: ``facetrt serve`` runs under ``fiu-run -x``; the test turns failure points on and off
in the running process with ``fiu-ctrl`` (see ``tests/faults/daemon.py`` for which code makes
which call). The first test fails one call at a time (``onetime``) on an otherwise idle node,
so each fault lands in the commit under test: facet stores, a new store's directory fsync, the
system store and the timer index. The second injects faults at random under load.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pytest
import trio

from facetrt import InternalError
from facetrt.client import connect
from tests.crash import verify_environments
from tests.faults.daemon import FaultDaemon, fiu_available
from tests.faults.workload import (
    Ledger,
    LoadShape,
    read_counters,
    record_failure,
    run_load,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import httpx

    from facetrt.client import AsyncClient

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not fiu_available(), reason="fiu-utils is not installed (.ci/run installs it)"
    ),
]

COMMIT_FAULTS = ("fdatasync", "pwrite", "writev")


async def _run(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Run a blocking call of the daemon's (a subprocess) off the event loop."""
    await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def _wait_fired(client: AsyncClient, agent: str, name: str) -> None:
    with trio.fail_after(30):
        while (await client.call(agent, "fired", cls="Alarm")) != {name: 1}:
            await trio.sleep(0.05)


async def _create_tenant(
    daemon: FaultDaemon, http: httpx.AsyncClient, tenant: str
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {daemon.admin_key}"}
    return await http.post("/v1/admin/tenants", json={"tenant": tenant}, headers=headers)


async def test_one_failed_call_at_a_time_resets_only_what_it_hit(tmp_path: Path) -> None:
    daemon = FaultDaemon(tmp_path)
    await _run(daemon.start)
    try:
        async with connect(daemon.url, key=daemon.key, retries=0) as client, daemon.http() as http:
            bystander = 1
            assert await client.call("bystander", "increment", cls="Counter") == bystander
            for kind in COMMIT_FAULTS:
                victim = f"victim-{kind}"
                assert await client.call(victim, "increment", cls="Counter") == 1
                await _run(daemon.enable, kind, once=True)
                with pytest.raises(
                    InternalError, match="commit failed; the facet was reset"
                ) as info:
                    await client.call(victim, "increment")
                assert info.value.retryable
                bystander += 1
                assert await client.call("bystander", "increment") == bystander
                assert (await http.get("/healthz")).status_code == 200
                assert await client.call(victim, "get") == 1  # the failed write left nothing
                assert await client.call(victim, "increment") == 2  # reset, and serving again
            assert await daemon.metric(http, "facetrt_facet_resets_total") == len(COMMIT_FAULTS)
            assert await daemon.metric(http, "facetrt_commit_failures_total") == len(COMMIT_FAULTS)

            # A new facet's directories must be fsynced before it is used: while that fails,
            # so does every attempt to create it (a retry must not skip the fsync).
            await _run(daemon.enable, "fsync")
            for _ in range(2):
                with pytest.raises(InternalError, match="cannot open store"):
                    await client.call("fresh", "increment", cls="Counter")
            await _run(daemon.disable, "fsync")
            assert await client.call("fresh", "increment", cls="Counter") == 1

            # The system store: a failed tenant creation is a clear, retryable error, leaves
            # nothing behind (the retry is not a conflict), and the node keeps serving.
            for kind in COMMIT_FAULTS:
                await _run(daemon.enable, kind, once=True)
                failed = await _create_tenant(daemon, http, f"tenant-{kind}")
                await _run(daemon.disable, kind)  # if the create used no such call
                if failed.status_code != 201:
                    error = failed.json()["error"]
                    assert (failed.status_code, error["code"], error["retryable"]) == (
                        500,
                        "internal",
                        True,
                    )
                    assert "system store write failed" in error["message"]
                    created = await _create_tenant(daemon, http, f"tenant-{kind}")
                    assert created.status_code == 201, created.text
                    failed = created
                key = failed.json()["key"]
                async with connect(daemon.url, key=key, retries=0) as tenant:
                    assert await tenant.call("c", "increment", cls="Counter") == 1

            # The timer index: it is written before the facet commit, so its failure fails
            # the call and resets the facet; the next timer set is delivered.
            for kind in COMMIT_FAULTS:
                alarm = f"alarm-{kind}"
                assert await client.call(alarm, "list_timers", cls="Alarm") == []
                await _run(daemon.enable, kind, once=True)
                with pytest.raises(InternalError, match="timer index commit failed"):
                    await client.call(alarm, "set", "lost", after_seconds=0.1)
                await client.call(alarm, "set", "kept", after_seconds=0.1)
                await _wait_fired(client, alarm, "kept")
            assert (await http.get("/healthz")).status_code == 200
    finally:
        assert await trio.to_thread.run_sync(daemon.stop) == 0, daemon.stderr_text()[-3000:]
    assert "Traceback" not in daemon.stderr_text()
    verified, problems = verify_environments(daemon.data_dir)
    assert problems == []
    assert verified >= 2 + 1 + len(COMMIT_FAULTS) * 2 + 2  # facets, fresh, system, timers

    daemon.fiu = False  # the restart: everything acknowledged is there
    await _run(daemon.start)
    try:
        agents = ["bystander", "fresh", *(f"victim-{kind}" for kind in COMMIT_FAULTS)]
        values = await read_counters(daemon.url, daemon.key, agents)
        assert values == {"bystander": bystander, "fresh": 1} | {
            f"victim-{kind}": 2 for kind in COMMIT_FAULTS
        }
    finally:
        assert await trio.to_thread.run_sync(daemon.stop) == 0


async def test_random_faults_under_load_lose_no_acknowledged_write(tmp_path: Path) -> None:
    daemon = FaultDaemon(tmp_path)
    await _run(daemon.start)
    ledger = Ledger()
    shape = LoadShape(writers=tuple(f"w{index}" for index in range(6)), readers=("r0", "r1"))
    try:
        async with connect(daemon.url, key=daemon.key, retries=0) as client, daemon.http() as http:
            for reader in shape.readers:
                assert await client.call(reader, "increment", cls="Counter") == 1
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(run_load, daemon.url, daemon.key, http, shape, ledger, stop)
                for kind in COMMIT_FAULTS:
                    await _fault_window(daemon, ledger, kind, probability=0.1)
                await _fsync_window(daemon, ledger, client)
                await trio.sleep(0.2)  # writes go on after the last fault
                stop.set()
            assert ledger.health_checks > 0
            assert ledger.reads > 0
            resets = await daemon.metric(http, "facetrt_facet_resets_total")
            assert resets >= len(COMMIT_FAULTS)
    finally:
        assert await trio.to_thread.run_sync(daemon.stop) == 0, daemon.stderr_text()[-3000:]
    assert "Traceback" not in daemon.stderr_text()
    _, problems = verify_environments(daemon.data_dir)
    assert problems == []

    daemon.fiu = False
    await _run(daemon.start)
    try:
        values = await read_counters(daemon.url, daemon.key, sorted(ledger.facets))
    finally:
        assert await trio.to_thread.run_sync(daemon.stop) == 0
    lost, problems = ledger.check(values)
    assert (lost, problems) == (0, [])
    assert ledger.acknowledged > 0


async def _fault_window(daemon: FaultDaemon, ledger: Ledger, kind: str, probability: float) -> None:
    """Fail ``kind`` at random until at least three calls failed (so the faults hit)."""
    failed = ledger.failed
    await _run(daemon.enable, kind, probability=probability)
    try:
        with trio.fail_after(30):
            while ledger.failed < failed + 3:
                await trio.sleep(0.01)
    finally:
        await _run(daemon.disable, kind)


async def _fsync_window(daemon: FaultDaemon, ledger: Ledger, client: AsyncClient) -> None:
    """Fail every fsync while new facets are created (the only fsyncs: their directories);
    each new facet is called until acknowledged, through the fault and after it."""
    await _run(daemon.enable, "fsync")

    async def create(agent: str) -> None:
        entry = ledger.facet(agent)
        while True:
            try:
                value = await client.call(agent, "increment", cls="Counter")
            except InternalError as exc:
                record_failure(ledger, entry, agent, exc)
                await trio.sleep(0.005)
            else:
                assert isinstance(value, int)
                entry.acks.append(value)
                return

    agents = [f"new-{index}" for index in range(3)]
    async with trio.open_nursery() as nursery:
        for agent in agents:
            nursery.start_soon(create, agent)
        with trio.fail_after(30):
            while sum(ledger.facet(agent).failures.total() for agent in agents) < len(agents):
                await trio.sleep(0.01)
        await _run(daemon.disable, "fsync")
