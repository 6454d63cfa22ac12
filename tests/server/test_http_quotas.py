"""Quotas and overload through a real daemon: the admin quota routes, the CLI on top of them
(and on the data directory without a daemon), refusals over HTTP, metrics and /readyz."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import trio

from facetrt import cli
from tests.facets import Gate
from tests.server.test_http import CLASSES, Served, error_of, result_of, serve, served

if TYPE_CHECKING:
    from pathlib import Path

    import httpx
    import pytest

__all__ = ["served"]  # the fixture, shared with test_http


async def test_quotas_set_through_the_admin_api_apply_to_the_next_call(served: Served) -> None:
    client, admin = served.client, served.admin()
    key = await served.create_tenant("tenant-qz")
    result_of(await served.call(key, "tenant-qz/agent-qz-1/increment", {"class": "Counter"}))

    shown = await client.get("/v1/admin/tenants/tenant-qz/quotas", headers=admin)
    assert shown.status_code == 200, shown.text
    assert shown.json()["facets"] == 1
    assert shown.json()["overrides"] == {}
    assert shown.json()["quotas"]["calls_per_second"] is None

    put = await client.put(
        "/v1/admin/tenants/tenant-qz/quotas",
        json={"facets_max": 1, "calls_per_second": 0.001, "calls_burst": 2},
        headers=admin,
    )
    assert put.status_code == 200, put.text
    assert put.json()["quotas"]["facets_max"] == 1
    assert put.json()["overrides"] == {
        "facets_max": 1,
        "calls_per_second": 0.001,
        "calls_burst": 2,
    }

    refused = await served.call(key, "tenant-qz/agent-qz-2/increment", {"class": "Counter"})
    assert error_of(refused) == (429, "quota_exceeded")
    assert refused.json()["error"]["retryable"] is False
    assert (await served.inspect("tenant-qz/facets/agent-qz-2")).status_code == 404

    # One call spent a token above (the refused creation gave its own back): one is left,
    # and the next refills in 1000 s.
    assert result_of(await served.call(key, "tenant-qz/agent-qz-1/get")) == 1
    rated = await served.call(key, "tenant-qz/agent-qz-1/get")
    assert error_of(rated) == (429, "quota_exceeded")  # SPEC §4: the rate quota
    assert rated.json()["error"]["retryable"] is False

    # Every field back to the node default: a second facet may be created again.
    reset = await client.put("/v1/admin/tenants/tenant-qz/quotas", json={}, headers=admin)
    assert reset.json()["overrides"] == {}
    created = await served.call(key, "tenant-qz/agent-qz-2/increment", {"class": "Counter"})
    assert result_of(created) == 1

    text = (await client.get("/metrics")).text
    assert 'facetrt_refusals_total{reason="facets"} 1.0' in text
    assert 'facetrt_refusals_total{reason="rate"} 1.0' in text
    assert re.search(r"facetrt_commit_batch_envelopes_bucket\{le=\"1.0\"\} [1-9]", text)
    assert re.search(r"facetrt_commit_duration_seconds_count [1-9]", text)
    assert "facetrt_mailbox_oldest_age_seconds 0.0" in text
    assert "qz" not in text  # no tenant or agent id in any label


async def test_quota_routes_refuse_bad_input_and_unknown_tenants(served: Served) -> None:
    client, admin = served.client, served.admin()
    key = await served.create_tenant("acme")
    path = "/v1/admin/tenants/acme/quotas"
    for body in ({"facets_max": 0}, {"nope": 1}, {"calls_per_second": "fast"}, [1]):
        bad = await client.put(path, json=body, headers=admin)
        assert error_of(bad) == (400, "bad_request"), body
    missing = await client.put("/v1/admin/tenants/nobody/quotas", json={}, headers=admin)
    assert error_of(missing) == (404, "not_found")
    assert error_of(await client.get("/v1/admin/tenants/nobody/quotas", headers=admin)) == (
        404,
        "not_found",
    )
    tenant_key = {"Authorization": f"Bearer {key}"}
    assert error_of(await client.put(path, json={}, headers=tenant_key)) == (403, "forbidden")
    assert (await client.get(path, headers=admin)).json()["overrides"] == {}


async def test_quotas_survive_a_restart(tmp_path: Path) -> None:
    async with serve(tmp_path) as served:
        await served.create_tenant("acme")
        put = await served.client.put(
            "/v1/admin/tenants/acme/quotas",
            json={"mailbox_envelopes_max": 7},
            headers=served.admin(),
        )
        assert put.status_code == 200, put.text
    async with serve(tmp_path) as served:
        shown = await served.client.get("/v1/admin/tenants/acme/quotas", headers=served.admin())
        assert shown.json()["overrides"] == {"mailbox_envelopes_max": 7}
        assert shown.json()["quotas"]["mailbox_envelopes_max"] == 7
        listed = await served.client.get("/v1/admin/tenants", headers=served.admin())
        assert listed.json()["quotas"] == {"acme": {"mailbox_envelopes_max": 7}}


async def test_readyz_reports_saturation_without_turning_unready(served: Served) -> None:
    readyz = await served.client.get("/readyz")
    assert readyz.status_code == 200
    body = readyz.json()
    assert (body["ready"], body["draining"], body["saturated"]) == (True, False, False)
    assert body["saturation"]["reasons"] == []
    assert body["saturation"]["open_facets_max"] == served.daemon.config.runtime.open_facets_max


async def test_cli_sets_and_shows_quotas_through_the_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve(tmp_path) as served:
        key = await served.create_tenant("acme")
        result_of(await served.call(key, "acme/a/increment", {"class": "Counter"}))
        address = served.info.http_address
        assert address is not None
        base = [
            "--data-dir",
            str(served.info.data_dir),
            "--url",
            f"http://{address[0]}:{address[1]}",
        ]

        def run(*argv: str) -> int:
            return cli.main([argv[0], argv[1], *base, *argv[2:]])

        quota = ("tenant", "quota", "acme", "--facets", "1", "--mailbox", "5")
        assert await trio.to_thread.run_sync(run, *quota) == 0
        assert "facets_max=1 mailbox_envelopes_max=5" in capsys.readouterr().out
        refused = await served.call(key, "acme/b/increment", {"class": "Counter"})
        assert error_of(refused) == (429, "quota_exceeded")  # the next call, no restart

        more = ("tenant", "quota", "acme", "--facets", "default", "--calls-per-second", "50")
        assert await trio.to_thread.run_sync(run, *more) == 0
        capsys.readouterr()
        assert await trio.to_thread.run_sync(run, "tenant", "show", "acme") == 0
        shown = capsys.readouterr().out
        assert re.search(r"^facets\s+1$", shown, re.M)
        assert re.search(r"^facets_max\s+1000000 \(default\)$", shown, re.M)
        assert re.search(r"^mailbox_envelopes_max\s+5 \(set\)$", shown, re.M)
        assert re.search(r"^calls_per_second\s+50 \(set\)$", shown, re.M)
        assert re.search(r"^calls_burst\s+50 \(default\)$", shown, re.M)
        assert await trio.to_thread.run_sync(run, "tenant", "list", "--quotas") == 0
        assert re.search(
            r"^acme\s+mailbox_envelopes_max=5 calls_per_second=50", capsys.readouterr().out, re.M
        )
        bad = ("tenant", "quota", "acme", "--mailbox", "0")
        assert await trio.to_thread.run_sync(run, *bad) == 2
        assert "bad_request" in capsys.readouterr().err


async def test_cli_sets_quotas_on_the_data_directory_for_the_next_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "d")]

    def run(*argv: str) -> int:
        return cli.main([argv[0], argv[1], *data, *argv[2:]])

    assert run("tenant", "create", "acme") == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert run("tenant", "quota", "acme", "--facets", "1") == 0
    assert "applies them when it starts" in capsys.readouterr().out
    assert run("tenant", "show", "acme") == 0
    assert re.search(r"^facets_max\s+1 \(set\)$", capsys.readouterr().out, re.M)
    async with serve(tmp_path) as served:
        result_of(await served.call(key, "acme/a/increment", {"class": "Counter"}))
        refused = await served.call(key, "acme/b/increment", {"class": "Counter"})
        assert error_of(refused) == (429, "quota_exceeded")


async def test_calls_in_flight_bound_makes_http_requests_wait_not_fail(tmp_path: Path) -> None:
    Gate.events["hg"] = trio.Event()
    classes = {**CLASSES, "Gate": "tests.facets:Gate"}
    overrides = {"runtime.tenant_calls_in_flight_max": 2, "classes": classes}
    async with serve(tmp_path, **overrides) as served:
        runtime = served.daemon.runtime
        assert runtime is not None
        key = await served.create_tenant("acme")
        result_of(await served.call(key, "acme/hg/put", {"class": "Gate", "args": ["k", 0]}))
        responses: list[httpx.Response] = []

        async def gated(index: int) -> None:
            body = {"args": ["k", index]}
            responses.append(await served.call(key, "acme/hg/wait_and_put", body))

        async with trio.open_nursery() as nursery:
            for index in range(5):
                nursery.start_soon(gated, index)
            for _ in range(50):
                await trio.sleep(0.01)
            assert runtime.statistics().queued_envelopes == 1  # one running, one queued
            assert runtime.core.quotas.in_flight("acme").count == 2
            Gate.events["hg"].set()
        assert [result_of(response) for response in responses] == [None] * 5
        assert runtime.core.quotas.in_flight("acme").count == 0
