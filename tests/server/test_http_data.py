"""Data operations through a real daemon: the admin HTTP routes and the CLI on top of them,
and the CLI directly on a data directory when no daemon runs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import trio

from facetrt import ConflictError, cli
from facetrt.data import DataOperations
from tests.server.test_http import Served, error_of, result_of, serve, served

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["served"]  # the fixture, shared with test_http


async def test_admin_data_routes_need_the_admin_key(served: Served) -> None:
    key = await served.create_tenant("acme")
    result_of(await served.call(key, "acme/a/increment", {"class": "Counter"}))
    tenant = {"Authorization": f"Bearer {key}"}
    for method, path in [
        ("GET", "/v1/admin/tenants/acme/export/a"),
        ("DELETE", "/v1/admin/tenants/acme/facets/a"),
        ("POST", "/v1/admin/tenants/acme/rebind/a"),
        ("POST", "/v1/admin/backups"),
        ("POST", "/v1/admin/restores"),
    ]:
        assert error_of(await served.client.request(method, path)) == (401, "unauthorized")
        refused = await served.client.request(method, path, headers=tenant)
        assert error_of(refused) == (403, "forbidden")
    assert result_of(await served.call(key, "acme/a/increment")) == 2


async def test_export_import_clone_rebind_delete_over_http(served: Served) -> None:
    client, admin = served.client, served.admin()
    key = await served.create_tenant("acme")
    result_of(await served.call(key, "acme/team/a/increment", {"class": "Counter", "args": [5]}))
    exported = await client.get("/v1/admin/tenants/acme/export/team/a", headers=admin)
    assert exported.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in exported.content.splitlines()]
    assert lines[0]["class"] == "Counter"

    ndjson = {**admin, "Content-Type": "application/x-ndjson"}
    imported = await client.post(
        "/v1/admin/tenants/acme/import/b", content=exported.content, headers=ndjson
    )
    assert imported.json()["class"] == "Counter"
    assert result_of(await served.call(key, "acme/b/increment")) == 6
    again = await client.post(
        "/v1/admin/tenants/acme/import/b", content=exported.content, headers=ndjson
    )
    assert error_of(again) == (409, "conflict")
    bad = await client.post(
        "/v1/admin/tenants/acme/import/c?force=true", content=b"{nope\n", headers=ndjson
    )
    assert error_of(bad) == (400, "bad_request")
    assert "line 1" in bad.json()["error"]["message"]
    wrong_type = await client.post(
        "/v1/admin/tenants/acme/import/c", content=exported.content, headers=admin
    )
    assert error_of(wrong_type) == (415, "bad_request")
    assert error_of(await served.call(key, "acme/c/increment")) == (404, "not_found")

    cloned = await client.post(
        "/v1/admin/tenants/acme/clone/b", json={"to_agent": "d"}, headers=admin
    )
    assert cloned.status_code == 200, cloned.text
    assert result_of(await served.call(key, "acme/d/increment")) == 7
    rebound = await client.post(
        "/v1/admin/tenants/acme/rebind/d", json={"class": "AgentMemory"}, headers=admin
    )
    assert rebound.json()["previous_class"] == "Counter"
    assert error_of(await served.call(key, "acme/d/increment", {"class": "Counter"})) == (
        409,
        "conflict",
    )
    unknown = await client.post(
        "/v1/admin/tenants/acme/rebind/d", json={"class": "Nope"}, headers=admin
    )
    assert error_of(unknown) == (404, "not_found")

    deleted = await client.delete("/v1/admin/tenants/acme/facets/b", headers=admin)
    assert deleted.json() == {"agent": "b", "deleted": True}
    assert error_of(await served.call(key, "acme/b/increment")) == (404, "not_found")
    gone = await client.delete("/v1/admin/tenants/nobody/facets/b", headers=admin)
    assert error_of(gone) == (404, "not_found")


async def test_backup_and_restore_stream_progress(served: Served, tmp_path: Path) -> None:
    client, admin = served.client, served.admin()
    key = await served.create_tenant("acme")
    for agent in ("a", "b", "c"):
        result_of(await served.call(key, f"acme/{agent}/increment", {"class": "Counter"}))
    target = tmp_path / "backup"
    streamed = {**admin, "Accept": "application/x-ndjson"}
    response = await client.post(
        "/v1/admin/backups", json={"path": str(target), "tenant": "acme"}, headers=streamed
    )
    last = json.loads(response.content.splitlines()[-1])
    assert last["result"]["facets"] == 3
    refused = await client.post("/v1/admin/restores", json={"path": str(target)}, headers=admin)
    assert error_of(refused) == (409, "conflict")
    result_of(await served.call(key, "acme/a/increment"))
    restored = await client.post(
        "/v1/admin/restores", json={"path": str(target), "force": True}, headers=admin
    )
    assert restored.json()["facets"] == 3
    assert result_of(await served.call(key, "acme/a/increment")) == 2
    relative = await client.post("/v1/admin/backups", json={"path": "x"}, headers=admin)
    assert error_of(relative) == (400, "bad_request")


async def test_cli_acts_through_the_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve(tmp_path) as served:
        key = await served.create_tenant("acme")
        result_of(await served.call(key, "acme/a/increment", {"class": "Counter"}))
        base = [
            "--data-dir",
            str(served.info.data_dir),
            "--url",
            f"http://{served.info.http_address[0]}:{served.info.http_address[1]}",  # type: ignore[index]
        ]
        export = tmp_path / "a.jsonl"

        def run(*argv: str) -> int:
            return cli.main([argv[0], *argv[1:2], *base, *argv[2:]])

        assert await trio.to_thread.run_sync(run, "facet", "list", "acme") == 0
        assert "Counter" in capsys.readouterr().out
        exported = ("facet", "export", "acme", "a", "-o", str(export))
        assert await trio.to_thread.run_sync(run, *exported) == 0
        imported = ("facet", "import", "acme", "b", str(export))
        assert await trio.to_thread.run_sync(run, *imported) == 0
        backup = ("backup", str(tmp_path / "bk"), "--tenant", "acme")
        assert await trio.to_thread.run_sync(run, *backup) == 0
        output = capsys.readouterr()
        assert "2 facets" in output.out
        assert "backed up" in output.err
        assert await trio.to_thread.run_sync(run, "tenant", "delete", "acme") == 0
        assert "removed 2 facets" in capsys.readouterr().out


def test_cli_acts_on_the_data_directory_without_a_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "d")]
    assert cli.main(["tenant", "create", "acme", *data]) == 0
    export = tmp_path / "e.jsonl"
    export.write_text(
        '{"format": "facetrt-export", "version": 1}\n'
        '{"db": "meta", "key": "class", "value": "Counter"}\n'
        '{"db": "data", "key": "count", "value": 41}\n'
        '{"end": true, "entries": 2}\n'
    )
    assert cli.main(["facet", "import", *data, "acme", "a", str(export)]) == 0
    assert cli.main(["facet", "clone", *data, "acme", "a", "b"]) == 0
    capsys.readouterr()
    assert cli.main(["facet", "list", *data, "acme"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("Counter") == 2
    assert cli.main(["facet", "delete", *data, "acme", "a"]) == 0
    assert cli.main(["facet", "delete", *data, "acme", "a"]) == 2
    assert "not_found" in capsys.readouterr().err
    assert cli.main(["backup", str(tmp_path / "node"), *data]) == 0
    assert "backup of the node" in capsys.readouterr().out
    assert cli.main(["restore", str(tmp_path / "node"), *data]) == 2
    assert "conflict" in capsys.readouterr().err


async def test_restore_of_the_system_store_is_offline_only_and_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Goal: a node backup's system store (tenants, hashed keys) comes back with
    ``restore --system`` when no daemon runs, and never under a running daemon.

    Method: a daemon with a tenant, a key and a facet takes a node backup; the CLI's
    ``--system`` is refused while it runs. Then, offline: into a fresh data directory (the
    disaster case) the old tenant key works again on a new daemon, and a fresh admin key is
    written; over the old directory, ``--force`` is needed and removes a tenant created after
    the backup; a corrupted copy or a backup without a system store changes nothing.
    """
    node, tenant_backup = tmp_path / "node", tmp_path / "tenant"
    async with serve(tmp_path) as served:
        key = await served.create_tenant("acme")
        result_of(await served.call(key, "acme/a/increment", {"class": "Counter"}))
        for body in ({"path": str(node)}, {"path": str(tenant_backup), "tenant": "acme"}):
            backup = await served.client.post(
                "/v1/admin/backups", json=body, headers=served.admin()
            )
            assert backup.status_code == 200, backup.text
        await served.create_tenant("late")
        data_dir = served.info.data_dir
        url = f"http://{served.info.http_address[0]}:{served.info.http_address[1]}"  # type: ignore[index]
        argv = ["restore", str(node), "--system", "--force", "--data-dir", str(data_dir)]
        assert await trio.to_thread.run_sync(cli.main, [*argv, "--url", url]) == 2
        assert "stop it to restore the system store" in capsys.readouterr().err
        online = DataOperations(served.daemon.runtime, system=served.daemon.system)  # type: ignore[arg-type]
        with pytest.raises(ConflictError, match="daemon stopped"):
            await online.restore(node, system=True, force=True)
        listed = await served.client.get("/v1/admin/tenants", headers=served.admin())
        assert listed.json()["tenants"] == ["acme", "late"]

    def offline(*argv: str) -> int:
        return cli.main(list(argv))

    fresh = tmp_path / "fresh"
    assert (
        await trio.to_thread.run_sync(
            offline, "restore", str(node), "--system", "--data-dir", str(fresh)
        )
        == 0
    )
    output = capsys.readouterr().out
    assert "restored the system store and 1 facets" in output
    assert "new one in" in output
    async with serve(tmp_path, data_dir=str(fresh)) as served:
        assert result_of(await served.call(key, "acme/a/increment")) == 2
        listed = await served.client.get("/v1/admin/tenants", headers=served.admin())
        assert listed.json()["tenants"] == ["acme"]

    old = ("restore", str(node), "--system", "--data-dir", str(data_dir))
    assert await trio.to_thread.run_sync(offline, *old) == 2
    assert "holds tenants or keys" in capsys.readouterr().err
    assert await trio.to_thread.run_sync(offline, *old, "--force") == 0
    assert "new one in" not in capsys.readouterr().out  # its admin key is in the backup
    assert (
        await trio.to_thread.run_sync(offline, "tenant", "list", "--data-dir", str(data_dir)) == 0
    )
    assert capsys.readouterr().out.split() == ["acme"]

    partial = ("restore", str(tenant_backup), "--system", "--force", "--data-dir", str(fresh))
    assert await trio.to_thread.run_sync(offline, *partial) == 2
    assert "no system store" in capsys.readouterr().err
    tenant_create = ("tenant", "create", "after", "--data-dir", str(data_dir))
    assert await trio.to_thread.run_sync(offline, *tenant_create) == 0
    copy = node / "system" / "data.mdb"
    data = bytearray(await trio.to_thread.run_sync(copy.read_bytes))
    data[-100] ^= 0xFF
    await trio.to_thread.run_sync(copy.write_bytes, bytes(data))
    assert await trio.to_thread.run_sync(offline, *old, "--force") == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert (
        await trio.to_thread.run_sync(offline, "tenant", "list", "--data-dir", str(data_dir)) == 0
    )
    assert "after" in capsys.readouterr().out  # nothing changed


async def test_facet_listing_refuses_a_limit_that_is_not_an_ascii_number(served: Served) -> None:
    await served.create_tenant("acme")
    for limit in ("%C2%B2", "0", "1001", "x", "-1"):  # "²" passes str.isdigit, not int()
        response = await served.client.get(
            f"/v1/admin/tenants/acme/facets?limit={limit}", headers=served.admin()
        )
        assert error_of(response) == (400, "bad_request"), limit


async def test_a_tenant_name_is_reused_only_over_a_clean_slate(served: Served) -> None:
    """Facets left on disk by a tenant delete that did not finish are never handed to a new
    tenant of the same name: creating it is refused until the delete is run again."""
    from facetrt.storage import tenant_path

    client, admin = served.client, served.admin()
    leftover = tenant_path(served.info.data_dir, "ghost") / "facets" / "ab"
    leftover.mkdir(parents=True)  # what an interrupted wipe leaves behind
    refused = await client.post("/v1/admin/tenants", json={"tenant": "ghost"}, headers=admin)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "conflict"
    listed = await client.get("/v1/admin/tenants", headers=admin)
    assert "ghost" not in listed.text  # nothing was created
    wiped = await client.delete("/v1/admin/tenants/ghost", headers=admin)
    assert wiped.status_code == 200, wiped.text
    assert not leftover.exists()
    created = await client.post("/v1/admin/tenants", json={"tenant": "ghost"}, headers=admin)
    assert created.status_code == 201, created.text
