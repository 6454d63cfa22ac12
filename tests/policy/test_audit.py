"""The durable audit log: written before a request leaves, found after SIGKILL, bounded,
readable through the admin API and the CLI, counted in metrics without tenant labels."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from facetrt import UnavailableError, cli
from facetrt._fetch import FetchRequest
from facetrt.client import connect
from facetrt.policy import Egress, EgressConfig
from facetrt.policy._audit import AuditLog, AuditRecord, read_offline
from facetrt.policy._policies import Policies
from facetrt.storage import SystemStore
from tests.policy.test_fetch import TENANT, local_policy, setup
from tests.policy.upstream import serve_upstream

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(rb"protocol tcp://127\.0\.0\.1:(\d+), HTTP (\S+)")


def _record(when: float, path: str) -> AuditRecord:
    return AuditRecord(
        time=when,
        tenant=TENANT,
        agent="a",
        run="r",
        source="fetch",
        method="GET",
        scheme="https",
        host="example.com",
        port=443,
        path=path,
        decision="allowed",
        rule="allow[0]",
        reason="allowed",
    )


async def test_a_fetch_cancelled_while_the_audit_queue_is_full_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    """Goal: cancelling a fetch that waits for room in the audit queue (backpressure) just
    cancels it: its record was never queued, so there is nothing to complete. Method: an
    egress whose audit writer is not running and a queue of one; the first fetch fills it."""
    policy = local_policy(9)
    egress = Egress(
        EgressConfig(audit_pending_max=1),
        data_dir=tmp_path,
        policies=Policies(None, {TENANT: policy}),
    )
    request = FetchRequest(url="http://127.0.0.1:9/", method="GET", headers=(), body=None)

    async def fetch(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await egress.fetch(request, tenant=TENANT, agent="a", run_id="r")

    async with trio.open_nursery() as nursery:
        first = await nursery.start(fetch)
        await trio.testing.wait_all_tasks_blocked()
        second = await nursery.start(fetch)
        await trio.testing.wait_all_tasks_blocked()
        second.cancel()  # waiting for room: raised AssertionError from complete_nowait
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()


async def test_concurrent_attempts_share_commits_and_retention_bounds_the_log(
    tmp_path: Path,
) -> None:
    """Goal: group commit and both retention bounds. Method: 50 attempts at once; then more
    than the count bound, and one record older than the retention."""
    config = EgressConfig(audit_records_max=30, audit_retention_seconds=3600)
    log = AuditLog(tmp_path, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        now = time.time()
        old = _record(now - 7200, "/old")
        await log.attempt(old)
        async with trio.open_nursery() as attempts:
            for index in range(50):
                attempts.start_soon(log.attempt, _record(now + index / 1000, f"/{index}"))
        stats = log.statistics()
        assert stats.records == 51
        assert stats.commits < 51  # concurrent attempts were group-committed
        records, cursor = await log.read(TENANT, since=None, after=None, limit=100)
        assert cursor is None
        assert [r["path"] for r in records] == [f"/{i}" for i in range(20, 50)]
        page, cursor = await log.read(TENANT, since=None, after=None, limit=10)
        assert cursor is not None
        rest, _ = await log.read(TENANT, since=None, after=cursor, limit=100)
        assert [r["path"] for r in page + rest] == [r["path"] for r in records]
        recent, _ = await log.read(TENANT, since=now + 0.045, after=None, limit=100)
        assert [r["path"] for r in recent] == [f"/{i}" for i in range(45, 50)]
        nursery.cancel_scope.cancel()
    assert log.statistics().pruned == 21


@pytest.mark.slow
async def test_an_attempt_cut_by_sigkill_is_in_the_audit_log_after_restart(
    tmp_path: Path,
) -> None:
    """Goal: the attempt's record is durable before the request leaves. Method: a daemon
    process fetches from a local server that never answers; once the request has arrived,
    SIGKILL the daemon; restart it and find the attempt through the admin API."""
    data_dir = tmp_path / "d"
    async with serve_upstream() as upstream:
        system = SystemStore(data_dir / "system")
        system.create_tenant(TENANT)
        _, key = system.create_key(TENANT)
        system.set_tenant_egress(TENANT, local_policy(upstream.port).to_json())
        system.close()
        config = tmp_path / "facetrt.toml"
        config.write_text(
            f'data_dir = "{data_dir}"\n[classes]\nFetcher = "tests.facets:Fetcher"\n'
            '[server]\nlisten = "127.0.0.1:0"\nhttp = "127.0.0.1:0"\n'
        )
        process, port, _ = await _start_daemon(config)
        try:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    async with connect(f"tcp://127.0.0.1:{port}", key=key, retries=0) as client:
                        with contextlib.suppress(UnavailableError):  # the daemon was killed
                            url = f"{upstream.base}/hang"
                            await client.call("f", "request", url, cls="Fetcher")

                nursery.start_soon(call)
                with trio.fail_after(30):
                    await upstream.arrived.wait()
                process.kill()  # SIGKILL
                await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
        assert process.returncode == -signal.SIGKILL
        process, _, http = await _start_daemon(config)
        try:
            admin_key = (data_dir / "admin.key").read_text().strip()
            async with httpx.AsyncClient(base_url=http, timeout=10) as client:
                response = await client.get(
                    f"/v1/admin/tenants/{TENANT}/audit?since={time.time() - 600}",
                    headers={"Authorization": f"Bearer {admin_key}"},
                )
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await process.wait()
    (record,) = response.json()["records"]
    assert record["path"] == "/hang"
    assert record["decision"] == "allowed"
    assert record["address"] == "127.0.0.1"
    assert record["status"] is None
    assert record["error"] == "incomplete"  # written before sending, never completed


async def _start_daemon(config: Path) -> tuple[trio.Process, int, str]:
    command = [sys.executable, "-m", "facetrt", "--log-level", "WARNING", "serve"]
    process = await trio.lowlevel.open_process(
        [*command, "--config", str(config)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert process.stdout is not None
    output = b""
    with trio.fail_after(30):
        while (match := SERVING.search(output)) is None:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"daemon exited early: {output!r}"
            output += chunk
    return process, int(match.group(1)), match.group(2).decode()


async def test_cli_shows_the_audit_log_as_a_table_and_json_lines(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with setup(data_dir) as s:
        await s.fetch("/echo?q=secret-query")
        with pytest.raises(Exception, match="default-deny"):
            await s.fetch("http://example.com/")
    argv = ["--data-dir", str(data_dir), "--tenant", TENANT]
    capsys.readouterr()
    assert await trio.to_thread.run_sync(cli.main, ["audit", *argv, "--since", "1h"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["TIME", "(UTC)", "SOURCE"]
    assert "allowed" in table[1]
    assert "/echo?q=[redacted]" in table[1]
    assert "default-deny" in table[2]
    assert "secret-query" not in "".join(table)
    assert await trio.to_thread.run_sync(cli.main, ["audit", *argv, "--json", "--limit", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["status"] == 200
    assert read_offline(data_dir, "nobody", since=None, after=None, limit=10) == ([], None)


async def test_metrics_count_decisions_by_reason_without_tenant_labels(data_dir: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from facetrt.metrics import FacetrtMetrics

    async with setup(data_dir) as s:
        registry = CollectorRegistry()
        FacetrtMetrics(registry, egress=s.egress.statistics)
        await s.fetch("/echo")
        with pytest.raises(Exception, match="address:metadata"):
            await s.fetch("http://169.254.169.254/")
        await s.egress.audit.wait_flushed()
        text = generate_latest(registry).decode()
    assert (
        'facetrt_egress_requests_total{decision="allowed",reason="allowed",source="fetch"} 1.0'
        in text
    )
    assert (
        'facetrt_egress_requests_total{decision="denied",reason="address",source="fetch"} 1.0'
        in text
    )
    assert "facetrt_audit_records_total 2.0" in text
    assert TENANT not in text
