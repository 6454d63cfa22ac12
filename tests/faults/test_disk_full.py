"""A full disk under the running daemon: clear errors, nothing corrupted, service resumes.

Goal: while the data directory's disk is full, a write that needs space fails at once with a
retryable ``internal`` naming the cause (decision 0012: a full disk is a storage failure of
the node, not the tenant's ``quota_exceeded``), resetting only that facet; reads, ``/healthz``
and writes that still fit go on, and no process dies (LMDB's lock file of a new store is
allocated before it is mapped: see ``reserve_lock_file``). When space returns the same daemon
serves every write again, without a restart; after it stops every acknowledged write is there
and every LMDB environment verifies.

Method: the daemon's data directory is on a small tmpfs filled by a filler file, or (where
mounting is refused, and as a second case) under a file size limit (``tests/faults/disk.py``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pytest
import trio

from facetrt import FacetrtError, InternalError
from facetrt.client import connect
from tests.crash import verify_environments
from tests.faults.disk import small_disk
from tests.faults.workload import Ledger, read_counters, record_failure

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from facetrt.client import AsyncClient

pytestmark = pytest.mark.slow

COUNTERS = tuple(f"c{index}" for index in range(4))
BIG_VALUE = "x" * 512 * 1024  # needs new pages whatever LMDB has free


async def _run(fn: Callable[..., object], *args: object) -> object:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


async def _increment(client: AsyncClient, ledger: Ledger, agent: str) -> None:
    entry = ledger.facet(agent)
    try:
        value = await client.call(agent, "increment", cls="Counter")
    except FacetrtError as exc:
        record_failure(ledger, entry, agent, exc)
    else:
        assert isinstance(value, int)
        entry.acks.append(value)


@pytest.mark.parametrize("prefer", ["tmpfs", "rlimit"])
async def test_full_disk_fails_writes_clearly_and_serves_again_when_space_returns(
    tmp_path: Path, prefer: str
) -> None:
    ledger = Ledger()
    with small_disk(tmp_path, prefer="rlimit" if prefer == "rlimit" else "tmpfs") as disk:
        daemon = disk.make_daemon()
        await _run(daemon.start)
        async with connect(daemon.url, key=daemon.key, retries=0) as client, daemon.http() as http:
            for agent in COUNTERS:
                await _increment(client, ledger, agent)
            await client.call("big", "put", "kept", "y" * 1000, cls="Register")
            await _run(disk.fill)

            for _ in range(3):
                with pytest.raises(
                    InternalError, match="commit failed; the facet was reset"
                ) as info:
                    await client.call("big", "put", "refused", BIG_VALUE)
                assert info.value.retryable
            for agent in COUNTERS:  # each fits in pages LMDB has free, or fails the same way
                await _increment(client, ledger, agent)
            if disk.kind == "tmpfs":  # a new store needs blocks (a file size limit allows it)
                with pytest.raises(InternalError, match="cannot open store"):
                    await client.call("new", "increment", cls="Counter")
            headers = {"Authorization": f"Bearer {daemon.admin_key}"}
            response = await http.post("/v1/admin/tenants", json={"tenant": "t"}, headers=headers)
            if response.status_code != 201:
                error = response.json()["error"]
                assert (response.status_code, error["code"], error["retryable"]) == (
                    500,
                    "internal",
                    True,
                ), response.text
                assert "system store write failed" in error["message"]
            assert await client.call("big", "get", "kept") == "y" * 1000
            assert await client.call("big", "get", "refused") is None
            assert (await http.get("/healthz")).status_code == 200

            await _run(disk.free)  # the same daemon, no restart
            await client.call("big", "put", "refused", BIG_VALUE)
            assert await client.call("big", "get", "refused") == BIG_VALUE
            assert await client.call("new", "increment", cls="Counter") == 1
            for agent in COUNTERS:
                value = await client.call(agent, "increment")
                assert isinstance(value, int)
                ledger.facet(agent).acks.append(value)
        assert await _run(daemon.stop) == 0
        assert "Traceback" not in daemon.stderr_text()
        verified, problems = verify_environments(disk.data_dir)
        assert problems == []
        assert verified == len(COUNTERS) + 2 + 2  # counters, big, new, system, timers

        await _run(daemon.start)
        try:
            values = await read_counters(daemon.url, daemon.key, list(COUNTERS))
        finally:
            assert await _run(daemon.stop) == 0
    assert ledger.check(values) == (0, [])
    assert set(ledger.failures_by_code()) <= {"internal"}
