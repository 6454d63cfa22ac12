"""Secrets: sealed at rest, injected only for bound hosts, never seen by facet code, logs,
errors or audit records, even when the remote server echoes them back."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import stat
from typing import TYPE_CHECKING

import pytest
import trio

from facetrt import BadRequestError, ConfigError, PolicyViolationError, cli
from facetrt.policy import NodeKey, Redactor, Secret, Secrets
from facetrt.policy._redact import RedactingFilter
from facetrt.storage import SystemStore
from tests.policy.test_fetch import TENANT, local_policy, setup
from tests.policy.upstream import serve_upstream
from tests.server.test_http import result_of, serve

if TYPE_CHECKING:
    from pathlib import Path

VALUE = "s3cr3t-Value-0123456789abcdef"
TOKEN = "sk-proj0123456789abcdefghij"


def loopback_secret(port: int) -> Secret:
    del port
    return Secret(name="API_KEY", value=VALUE, hosts=("127.0.0.1",), allow_http=True)


def test_secrets_are_sealed_with_the_node_key_and_bound_to_their_slot(tmp_path: Path) -> None:
    key = NodeKey.load_or_create(tmp_path)
    key_file = tmp_path / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert NodeKey.load_or_create(tmp_path).open(
        "acme", "A", key.seal("acme", "A", VALUE, ["api.example.com"], allow_http=False)
    ) == Secret(name="A", value=VALUE, hosts=("api.example.com",), allow_http=False)
    record = key.seal("acme", "A", VALUE, ["*.example.com"], allow_http=False)
    assert VALUE not in json.dumps(record)
    with pytest.raises(ConfigError, match="does not open"):
        key.open("other", "A", record)  # moved to another tenant
    with pytest.raises(ConfigError, match="does not open"):
        NodeKey(os.urandom(32)).open("acme", "A", record)
    for bad_value in ("short", "line\nbreak-0123456789"):
        with pytest.raises(Exception, match="secret value"):
            key.seal("acme", "A", bad_value, ["a.com"], allow_http=False)
    for hosts in ([], ["*.com"], ["2130706433"]):
        with pytest.raises(Exception, match="bound"):
            key.seal("acme", "A", VALUE, hosts, allow_http=False)


def test_redaction_covers_every_spelling_and_token_shapes() -> None:
    redactor = Redactor({"K": VALUE.encode()})
    basic = base64.b64encode(f"user:{VALUE}".encode())
    for text in (VALUE.encode(), basic, base64.urlsafe_b64encode(b"xy" + VALUE.encode())):
        assert VALUE.encode() not in redactor.data(text)
        assert b"REDACTED" in redactor.data(text)
    assert redactor.text(f"Authorization: Bearer abcdefgh12345 and {TOKEN}") == (
        "Authorization: Bearer [REDACTED] and sk-[REDACTED]"
    )
    assert redactor.data(TOKEN.encode()) == TOKEN.encode()  # bodies keep token shapes


async def test_a_secret_reaches_its_bound_host_only_and_never_comes_back(
    data_dir: Path,
) -> None:
    async with setup(data_dir) as s:
        port = s.upstream.port
        s.egress.secrets.set_tenant(TENANT, [loopback_secret(port)])
        headers = {"Authorization": "Bearer {{secret:API_KEY}}", "X-Token": TOKEN}
        result = await s.fetch("/echo", headers=headers)
        # The server got the value ...
        assert s.upstream.headers[-1]["authorization"] == f"Bearer {VALUE}"
        # ... facet code did not, in the body or headers, raw or base64.
        dumped = json.dumps(result)
        assert VALUE not in dumped
        assert base64.b64encode(f"Bearer {VALUE}".encode()).decode()[12:30] not in dumped
        assert "Bearer [REDACTED:API_KEY]" in json.loads(result["text"])["headers"]["authorization"]
        assert ["x-echo-authorization", "Bearer [REDACTED:API_KEY]"] in result["headers"]
        requests_before = len(s.upstream.requests)
        for url, rule in (
            (f"http://localhost:{port}/echo", "secret:API_KEY"),  # not a bound host
            (f"http://127.0.0.1:{port}/echo#unknown", "secret:OTHER"),
        ):
            name = "OTHER" if "unknown" in url else "API_KEY"
            with pytest.raises(PolicyViolationError, match=f"rule {rule}") as denied:
                await s.fetch(
                    url.split("#")[0], headers={"Authorization": f"{{{{secret:{name}}}}}"}
                )
            assert VALUE not in str(denied.value)
        assert len(s.upstream.requests) == requests_before
        s.egress.secrets.set_tenant(
            TENANT, [Secret(name="API_KEY", value=VALUE, hosts=("127.0.0.1",), allow_http=False)]
        )
        with pytest.raises(PolicyViolationError, match=r"not bound to http://127\.0\.0\.1"):
            await s.fetch("/echo", headers={"Authorization": "{{secret:API_KEY}}"})
        records = await s.audit()
    assert VALUE not in json.dumps(records)
    assert [r["rule"] for r in records[-3:]] == ["secret:API_KEY", "secret:OTHER", "secret:API_KEY"]


async def test_a_secret_a_server_reflects_into_a_redirect_goes_nowhere_else(
    data_dir: Path,
) -> None:
    """Goal: a bound server that reflects the secret into a redirect's Location neither
    hands it to facet code (the final URL) nor makes egress carry it to an unbound host.
    Method: /redirect-auth redirects to /echo?auth=<the Authorization it got>, on the same
    host (bound) and on localhost (allowed by policy, not bound)."""
    async with setup(data_dir) as s:
        port = s.upstream.port
        s.egress.secrets.set_tenant(TENANT, [loopback_secret(port)])
        headers = {"Authorization": "{{secret:API_KEY}}"}
        result = await s.fetch("/redirect-auth", headers=headers)
        assert VALUE not in json.dumps(result)
        assert result["url"].endswith("/echo?auth=[REDACTED:API_KEY]")
        sent = len(s.upstream.requests)
        with pytest.raises(PolicyViolationError, match="rule secret:API_KEY") as denied:
            await s.fetch(f"/redirect-auth?base=http://localhost:{port}", headers=headers)
        assert "carries secret 'API_KEY'" in str(denied.value)
        assert VALUE not in str(denied.value)
        assert len(s.upstream.requests) == sent + 1  # the redirect only: not the next hop
        records = await s.audit()
    assert VALUE not in json.dumps(records)


async def test_no_error_quotes_a_substituted_secret(data_dir: Path) -> None:
    """Goal: a header value HTTP refuses is refused before a secret is put in it; else h11
    fails the request quoting the value (a backslash escaped past redaction) and httpx fails
    a non-ASCII one with a UnicodeEncodeError holding it. Secret values are header-safe."""
    escaped = "abc\\def-0123456789xyz"  # one backslash: escaped twice in bytes' repr
    secret = Secret(name="K", value=escaped, hosts=("127.0.0.1",), allow_http=True)
    legacy = Secret(name="OLD", value="caf\u00e9-0123456789", hosts=("127.0.0.1",), allow_http=True)
    async with setup(data_dir) as s:
        s.egress.secrets.set_tenant(TENANT, [secret, legacy])
        for value in ("{{secret:K}} ", "{{secret:K}}\x0b", "{{secret:K}}\u00e9"):
            with pytest.raises(BadRequestError) as refused:
                await s.fetch("/echo", headers={"X-A": value})
            assert "def-0123456789" not in str(refused.value)
        with pytest.raises(PolicyViolationError, match="cannot go in a header") as denied:
            await s.fetch("/echo", headers={"X-A": "{{secret:OLD}}"})
        assert "0123456789" not in str(denied.value)
        assert s.upstream.requests == []
    key = NodeKey.load_or_create(data_dir)
    for bad in ("caf\u00e9-0123456789", " leading-0123456789", "tab\tinside-0123456789"):
        with pytest.raises(BadRequestError, match="secret value must be visible ASCII"):
            key.seal(TENANT, "A", bad, ["a.com"], allow_http=False)


def test_the_logging_filter_redacts_secrets_and_token_shapes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets = Secrets({TENANT: [loopback_secret(0)]})
    log_filter = RedactingFilter(secrets.redactor)
    caplog.handler.addFilter(log_filter)
    try:
        logger = logging.getLogger("facetrt.test")
        logger.warning("sent %s with Authorization: Bearer %s", VALUE, "abcdefghijklmnop")
        try:
            raise ValueError(f"upstream said {VALUE} and {TOKEN}")
        except ValueError:
            logger.exception("failed")
    finally:
        caplog.handler.removeFilter(log_filter)
    assert VALUE not in caplog.text
    assert TOKEN not in caplog.text
    assert "[REDACTED:acme/API_KEY]" in caplog.text
    assert "Bearer [REDACTED]" in caplog.text


async def test_secrets_through_the_cli_and_the_daemon(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    classes = {"Fetcher": "tests.facets:Fetcher"}
    async with serve_upstream() as upstream, serve(tmp_path, classes=classes) as served:
        key = await served.create_tenant(TENANT)
        policy = local_policy(upstream.port).to_json()
        put = await served.client.put(
            f"/v1/admin/tenants/{TENANT}/egress", json=policy, headers=served.admin()
        )
        assert put.status_code == 200
        http = served.info.http_address
        assert http is not None
        base = ["--data-dir", str(served.info.data_dir), "--url", f"http://{http[0]}:{http[1]}"]
        monkeypatch.setattr("sys.stdin", io.StringIO(VALUE + "\n"))
        argv = ["secret", "set", TENANT, "API_KEY", "--host", "127.0.0.1", "--allow-http", *base]
        assert await trio.to_thread.run_sync(cli.main, argv) == 0
        assert await trio.to_thread.run_sync(cli.main, ["secret", "list", TENANT, *base]) == 0
        listed = capsys.readouterr().out
        assert "API_KEY" in listed
        assert "127.0.0.1" in listed
        body = {
            "class": "Fetcher",
            "args": [f"{upstream.base}/echo"],
            "kwargs": {"headers": {"Authorization": "Bearer {{secret:API_KEY}}"}},
        }
        result = result_of(await served.call(key, f"{TENANT}/f/request", body))
        assert upstream.headers[-1]["authorization"] == f"Bearer {VALUE}"
        assert VALUE not in json.dumps(result)
        logging.getLogger("facetrt.test").warning("leaked %s", VALUE)
        listing = await served.client.get(
            f"/v1/admin/tenants/{TENANT}/secrets", headers=served.admin()
        )
        assert VALUE not in listing.text
        delete = ["secret", "delete", TENANT, "API_KEY", *base]
        assert await trio.to_thread.run_sync(cli.main, delete) == 0
        denied = await served.call(key, f"{TENANT}/f/request", body)
        assert denied.json()["error"]["code"] == "policy_violation"
        data_dir = served.info.data_dir
    assert VALUE not in caplog.text
    assert "leaked [REDACTED:acme/API_KEY]" in caplog.text
    assert VALUE not in capsys.readouterr().out
    system = SystemStore(data_dir / "system")
    try:
        assert system.secrets(TENANT) == {}
    finally:
        system.close()


def test_secrets_without_a_daemon_and_removed_with_their_tenant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "d")]
    assert cli.main(["tenant", "create", TENANT, *data]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(VALUE))
    set_argv = ["secret", "set", TENANT, "K", "--host", "*.example.com", *data]
    assert cli.main(set_argv) == 0
    assert cli.main(["secret", "list", TENANT, *data]) == 0
    output = capsys.readouterr().out
    assert "*.example.com" in output
    assert VALUE not in output
    system = SystemStore(tmp_path / "d" / "system")
    try:
        record = system.secrets(TENANT)[(TENANT, "K")]
        opened = NodeKey.load_or_create(tmp_path / "d").open(TENANT, "K", record)
        assert opened.value == VALUE
        system.delete_tenant(TENANT)
        assert system.secrets() == {}
    finally:
        system.close()
    assert cli.main(["secret", "delete", TENANT, "K", *data]) == 2


def test_a_lost_node_key_is_not_replaced_while_secrets_are_sealed_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Goal: a node key file lost (deleted, or its creation undone by a power failure) while
    secrets are sealed with it is an error naming the problem, not a new key that opens none
    of them and would seal the next secrets differently. Method: set a secret offline, move
    node.key away, set another; put the file back and both work again."""
    data_dir = tmp_path / "d"
    data = ["--data-dir", str(data_dir)]
    assert cli.main(["tenant", "create", TENANT, *data]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(VALUE))
    assert cli.main(["secret", "set", TENANT, "K", "--host", "a.example.com", *data]) == 0
    key_file = data_dir / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (data_dir / "node.key.tmp").exists()
    kept = key_file.read_bytes()
    key_file.unlink()
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(VALUE))
    assert cli.main(["secret", "set", TENANT, "K2", "--host", "a.example.com", *data]) != 0
    assert "node key" in capsys.readouterr().err
    assert not key_file.exists()
    system = SystemStore(data_dir / "system")
    try:
        with pytest.raises(ConfigError, match=r"missing, and 1 secret\(s\) are sealed"):
            NodeKey.load_or_create(data_dir, sealed=len(system.secrets()))
        key_file.write_bytes(kept)
        record = system.secrets(TENANT)[(TENANT, "K")]
        assert NodeKey.load_or_create(data_dir, sealed=1).open(TENANT, "K", record).value == VALUE
    finally:
        system.close()


async def test_a_deleted_tenant_takes_its_policy_and_secrets_along(tmp_path: Path) -> None:
    """Goal: a tenant created again under a deleted one's name inherits nothing. Method:
    set a policy and a secret through the admin API, delete the tenant, create it again."""
    async with serve(tmp_path) as served:
        admin = served.admin()
        await served.create_tenant(TENANT)
        route = f"/v1/admin/tenants/{TENANT}"
        policy = {"allow": [{"host": "api.example.com"}]}
        assert (await served.client.put(f"{route}/egress", json=policy, headers=admin)).is_success
        secret = {"value": VALUE, "hosts": ["api.example.com"]}
        put = await served.client.put(f"{route}/secrets/K", json=secret, headers=admin)
        assert put.json() == {"name": "K", "hosts": ["api.example.com"], "allow_http": False}
        assert (await served.client.delete(route, headers=admin)).is_success
        await served.create_tenant(TENANT)
        egress = served.daemon.egress
        assert egress is not None
        assert egress.policies.own(TENANT) is None
        assert egress.secrets.for_tenant(TENANT).names() == []
        shown = await served.client.get(f"{route}/secrets", headers=admin)
        assert shown.json() == {"secrets": []}
