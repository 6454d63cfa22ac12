"""`facetrt key rotate-admin` and `POST /v1/admin/admin-key/rotate`: a real daemon over HTTP,
the real CLI (in this process, through the daemon or on its data directory) and the real
system store.

The admin key is looked for in everything the operator sees: the CLI's standard output and
error, and the log records of the CLI and of the daemon (which runs in this process, so
``caplog`` holds its records too). The daemon's log filter redacts key shapes, so for it the
check is that nothing key-shaped was logged at all (no ``[REDACTED]``)."""

from __future__ import annotations

import logging
import stat
from typing import TYPE_CHECKING

import trio

from facetrt import cli
from facetrt.config import load_daemon_config
from facetrt.server._daemon import Daemon
from tests.server.test_http import Served, error_of, result_of, serve, served

if TYPE_CHECKING:
    from pathlib import Path

    import httpx
    import pytest

__all__ = ["served"]  # the fixture, shared with test_http

ROUTE = "/v1/admin/admin-key/rotate"


def key_id_of(key: str) -> str:
    return key.removeprefix("frt_").partition("_")[0]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def read_key(path: Path) -> str:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path.read_text().strip()


async def admin_status(client: httpx.AsyncClient, key: str) -> int:
    return (await client.get("/v1/admin/tenants", headers=bearer(key))).status_code


def assert_not_shown(
    key: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> str:
    """The CLI's output so far, after checking that ``key`` is nowhere the operator sees."""
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert key not in text
        assert key.rpartition("_")[2] not in text  # not even the secret part
        assert "[REDACTED]" not in text  # nothing key-shaped was logged (and redacted)
    return captured.out + captured.err


def daemon_settings(data_dir: Path) -> dict[str, object]:
    return {
        "data_dir": str(data_dir),
        "server.listen": "127.0.0.1:0",
        "server.http": "127.0.0.1:0",
        "classes": {},
    }


def run_offline(data_dir: Path, *argv: str) -> int:
    return cli.main([argv[0], argv[1], "--data-dir", str(data_dir), *argv[2:]])


async def run_through(served: Served, *argv: str) -> int:
    address = served.info.http_address
    assert address is not None
    url = f"http://{address[0]}:{address[1]}"
    base = ["--data-dir", str(served.info.data_dir), "--url", url]
    return await trio.to_thread.run_sync(cli.main, [argv[0], argv[1], *base, *argv[2:]])


async def test_rotation_on_the_data_directory_replaces_the_admin_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "d"
    async with serve(tmp_path) as served:
        old = served.admin_key
        tenant_key = await served.create_tenant("acme")
    path = data_dir / "admin.key"

    assert run_offline(data_dir, "key", "rotate-admin") == 0
    new = read_key(path)
    assert new != old
    shown = assert_not_shown(new, capsys, caplog)
    assert f"key id {key_id_of(new)}" in shown
    assert str(path.absolute()) in shown
    assert f"revoked admin keys: {key_id_of(old)}" in shown
    assert not (data_dir / "admin.key.tmp").exists()

    async with serve(tmp_path) as served:
        assert served.admin_key == new  # the start kept the rotated key
        assert error_of(await served.client.get("/v1/admin/tenants", headers=bearer(old))) == (
            401,
            "unauthorized",
        )
        assert await admin_status(served.client, new) == 200
        result_of(await served.call(tenant_key, "acme/a/increment", {"class": "Counter"}))
    assert_not_shown(new, capsys, caplog)


async def test_rotation_through_the_daemon_refuses_the_old_key_on_the_next_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(tmp_path) as served:
        client, old = served.client, served.admin_key
        path = served.info.admin_key_path
        assert await admin_status(client, old) == 200  # a kept-alive connection, reused below

        assert await run_through(served, "key", "rotate-admin") == 0
        new = read_key(path)
        assert new != old
        shown = assert_not_shown(new, capsys, caplog)
        assert f"key id {key_id_of(new)}" in shown
        assert str(path.absolute()) in shown
        assert f"revoked admin keys: {key_id_of(old)}" in shown
        assert "note:" not in shown  # the CLI's key file is the daemon's

        refused = await client.get("/v1/admin/tenants", headers=bearer(old))
        assert error_of(refused) == (401, "unauthorized")
        assert await admin_status(client, new) == 200

        # The route itself: the path and ids only, never the key.
        answer = await client.post(ROUTE, headers=bearer(new))
        assert answer.status_code == 200, answer.text
        newest = read_key(path)
        assert answer.json() == {
            "path": str(path.absolute()),
            "key_id": key_id_of(newest),
            "revoked_key_ids": [key_id_of(new)],
        }
        assert newest not in answer.text
        assert await admin_status(client, new) == 401
        assert await admin_status(client, newest) == 200

        # The daemon refuses to revoke its last admin key (the caller's own), and says why.
        assert await run_through(served, "key", "revoke", key_id_of(newest)) == 2
        assert "rotate-admin" in capsys.readouterr().err
        assert await admin_status(client, newest) == 200
        assert_not_shown(newest, capsys, caplog)


async def test_rotation_through_the_daemon_notes_a_key_file_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--admin-key-file`` elsewhere authenticates the request; the daemon writes its own
    file, so the CLI says that the file it used now holds a revoked key."""
    async with serve(tmp_path) as served:
        elsewhere = tmp_path / "operator.key"
        elsewhere.write_text(served.admin_key + "\n")
        assert (
            await run_through(served, "key", "rotate-admin", "--admin-key-file", str(elsewhere))
            == 0
        )
        assert elsewhere.read_text().strip() == served.admin_key
        assert f"note: {elsewhere} still holds the old" in capsys.readouterr().err
        assert await admin_status(served.client, read_key(served.info.admin_key_path)) == 200


async def test_rotation_from_another_machine_goes_through_the_daemon_given_its_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found in review: from a workstation (no data directory of the node), the CLI found
    ./facetrt-data unlocked, created it and rotated *that* empty node's admin key, writing it
    over --admin-key-file (the operator's copy of the real one) and reporting success. An
    explicit --url now always acts through that daemon; without one, rotating needs an
    existing node's data directory."""
    async with serve(tmp_path) as served:
        address = served.info.http_address
        assert address is not None
        workstation = tmp_path / "workstation"
        workstation.mkdir()
        copy = workstation / "prod-admin.key"
        copy.write_text(served.admin_key + "\n")
        monkeypatch.chdir(workstation)
        argv = ["key", "rotate-admin", "--admin-key-file", str(copy)]
        url = f"http://{address[0]}:{address[1]}"
        assert await trio.to_thread.run_sync(cli.main, [*argv, "--url", url]) == 0
        assert not (workstation / "facetrt-data").exists()
        assert copy.read_text().strip() == served.admin_key  # untouched (and now revoked)
        assert await admin_status(served.client, served.admin_key) == 401
        assert await admin_status(served.client, read_key(served.info.admin_key_path)) == 200
        capsys.readouterr()
        assert await trio.to_thread.run_sync(cli.main, argv) == 2  # no --url, no node here
        assert "no facetrt data directory" in capsys.readouterr().err
        assert not (workstation / "facetrt-data").exists()


async def test_a_deleted_admin_key_is_recovered_by_rotating_on_the_data_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "d"
    path = data_dir / "admin.key"
    async with serve(tmp_path) as served:
        lost = served.admin_key
    path.unlink()
    # A start only warns (and before `rotate-admin`, nothing could write another admin key).
    with caplog.at_level(logging.WARNING):
        daemon = Daemon(load_daemon_config(overrides=daemon_settings(data_dir)))
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            assert not path.exists()
            daemon.stop()
    assert "missing or holds no active admin key" in caplog.text
    assert "rotate-admin" in caplog.text

    assert run_offline(data_dir, "key", "rotate-admin") == 0
    new = read_key(path)
    assert_not_shown(new, capsys, caplog)
    async with serve(tmp_path) as served:
        assert await admin_status(served.client, new) == 200
        assert await admin_status(served.client, lost) == 401  # it may have leaked: revoked


async def test_rotation_route_needs_the_admin_key(served: Served) -> None:
    client, path = served.client, served.info.admin_key_path
    tenant_key = await served.create_tenant("acme")
    assert error_of(await client.post(ROUTE)) == (401, "unauthorized")
    wrong = served.admin_key[:-4] + ("AAAA" if not served.admin_key.endswith("AAAA") else "BBBB")
    assert error_of(await client.post(ROUTE, headers=bearer(wrong))) == (401, "unauthorized")
    assert error_of(await client.post(ROUTE, headers=bearer("not-a-key"))) == (
        401,
        "unauthorized",
    )
    assert error_of(await client.post(ROUTE, headers=bearer(tenant_key))) == (403, "forbidden")
    admin = served.admin()
    assert error_of(await client.get(ROUTE, headers=admin)) == (405, "bad_request")
    body = await client.post(ROUTE, json={"key": "mine"}, headers=admin)
    assert error_of(body) == (400, "bad_request")
    # Nothing changed: the same file, the same key, still valid.
    assert read_key(path) == served.admin_key
    assert await admin_status(client, served.admin_key) == 200


async def test_revoking_the_last_admin_key_on_the_data_directory_is_undone_by_the_next_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline, the last admin key may be revoked (the operator holds the data directory);
    the command says so, and the next start writes a new admin key over the revoked one."""
    data_dir = tmp_path / "d"
    async with serve(tmp_path) as served:
        old = served.admin_key
    assert run_offline(data_dir, "key", "revoke", key_id_of(old)) == 0
    assert "no admin key is active now" in capsys.readouterr().out
    async with serve(tmp_path) as served:
        assert served.admin_key != old
        assert await admin_status(served.client, served.admin_key) == 200
        assert await admin_status(served.client, old) == 401
