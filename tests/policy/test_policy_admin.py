"""Egress policies through the admin API and the CLI: validated, durable, applied at once."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import trio

from facetrt import cli
from facetrt.policy._addresses import parse_host
from facetrt.storage import SystemStore
from tests.server.test_http import error_of, serve

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

POLICY = {"allow": [{"host": "api.example.com", "methods": ["GET"]}]}


async def test_admin_api_sets_shows_and_resets_a_policy_durably(tmp_path: Path) -> None:
    async with serve(tmp_path) as served:
        await served.create_tenant("acme")
        route = "/v1/admin/tenants/acme/egress"
        shown = await served.client.get(route, headers=served.admin())
        assert shown.json() == {
            "tenant": "acme",
            "policy": {"allow": [], "addresses": []},
            "source": "default",
        }
        put = await served.client.put(route, json=POLICY, headers=served.admin())
        assert put.status_code == 200, put.text
        assert put.json()["source"] == "tenant"
        assert put.json()["policy"]["allow"][0]["host"] == "api.example.com"
        egress = served.daemon.egress
        assert egress is not None
        host = parse_host("api.example.com")
        decision = egress.policies.get("acme").decide_request("https", host, 443, "GET", "/")
        assert decision.allowed  # in force at once, without a restart
        bad = await served.client.put(
            route, json={"allow": [{"host": "0x7f.1"}]}, headers=served.admin()
        )
        assert error_of(bad) == (400, "bad_request")
        assert "numeric address spelling" in bad.json()["error"]["message"]
        missing = await served.client.get("/v1/admin/tenants/nobody/egress", headers=served.admin())
        assert error_of(missing) == (404, "not_found")
        tenant_key = await served.create_tenant("other")
        forbidden = await served.client.get(
            route, headers={"Authorization": f"Bearer {tenant_key}"}
        )
        assert error_of(forbidden)[1] in {"forbidden", "unauthorized"}
        data_dir = served.info.data_dir
    system = SystemStore(data_dir / "system")
    try:
        assert system.tenant_egress("acme") == put.json()["policy"]
    finally:
        system.close()
    async with serve(tmp_path) as served:  # loaded at start
        shown = await served.client.get(route, headers=served.admin())
        assert shown.json()["source"] == "tenant"
        reset = await served.client.delete(route, headers=served.admin())
        assert reset.json()["source"] == "default"


def test_cli_sets_and_shows_a_policy_without_a_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "d")]
    assert cli.main(["tenant", "create", "acme", *data]) == 0
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(POLICY))
    assert cli.main(["egress", "set", "acme", "--file", str(policy_file), *data]) == 0
    capsys.readouterr()
    assert cli.main(["egress", "show", "acme", *data]) == 0
    shown = capsys.readouterr().out
    assert "(tenant)" in shown
    assert '"api.example.com"' in shown
    policy_file.write_text('{"allow": [{"host": "a.com", "ports": [70000]}]}')
    assert cli.main(["egress", "set", "acme", "--file", str(policy_file), *data]) == 2
    assert "invalid egress policy" in capsys.readouterr().err
    assert cli.main(["egress", "reset", "acme", *data]) == 0
    assert "(default)" in capsys.readouterr().out


async def test_cli_goes_through_a_running_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve(tmp_path) as served:
        await served.create_tenant("acme")
        policy_file = tmp_path / "policy.json"
        policy_file.write_text(json.dumps(POLICY))
        http = served.info.http_address
        assert http is not None
        base = ["--data-dir", str(served.info.data_dir), "--url", f"http://{http[0]}:{http[1]}"]
        argv = ["egress", "set", "acme", "--file", str(policy_file), *base]
        assert await trio.to_thread.run_sync(cli.main, argv) == 0
        assert served.daemon.egress is not None
        assert served.daemon.egress.policies.own("acme") is not None
        capsys.readouterr()
