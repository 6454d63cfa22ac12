"""The egress proxy: per-run credentials, plain requests (http and https targets, with secrets
injected and redacted), CONNECT tunnels decided by host and port, all audited."""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
import httpx
import pytest
import trio
from pydantic import ValidationError

from facetrt.policy import (
    Egress,
    EgressConfig,
    EgressPolicy,
    EgressProxy,
    ProxyCredential,
    Secret,
    Secrets,
    open_egress,
)
from facetrt.policy._proxy import IDLE_SECONDS
from tests.policy.test_fetch import TENANT, local_policy
from tests.policy.upstream import Upstream, make_certificate, serve_upstream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

VALUE = "proxy-secret-0123456789abcdef"


@dataclass
class Proxied:
    egress: Egress
    upstream: Upstream
    credential: ProxyCredential
    address: tuple[str, int]

    def client(self, credential: ProxyCredential | None = None) -> httpx.AsyncClient:
        credential = credential or self.credential
        url = credential.url(*self.address)
        return httpx.AsyncClient(proxy=url, timeout=10, trust_env=False)

    async def audit(self) -> list[dict[str, Any]]:
        records, _ = await self.egress.audit.read(TENANT, since=None, after=None, limit=100)
        return records


@contextlib.asynccontextmanager
async def proxied(tmp_path: Path, *, tls: bool = False) -> AsyncIterator[Proxied]:
    certificate = make_certificate(tmp_path) if tls else None
    config = EgressConfig(proxy_listen="127.0.0.1:0", ca_file=certificate and certificate[0])
    async with serve_upstream(certificate) as upstream:
        port = upstream.port
        policy = local_policy(port).to_json()
        assert isinstance(policy["allow"], list)
        policy["allow"].append({"host": "127.0.0.1", "schemes": ["https"], "ports": [port]})
        policy["allow"].append(
            {"host": "methods.test", "schemes": ["http"], "ports": [port], "methods": ["GET"]}
        )
        secrets = Secrets(
            {TENANT: [Secret(name="K", value=VALUE, hosts=("127.0.0.1",), allow_http=False)]}
        )
        async with (
            open_egress(
                tmp_path / "d",
                config=config,
                policies={TENANT: EgressPolicy.parse(policy)},
                secrets=secrets,
            ) as egress,
            trio.open_nursery() as nursery,
        ):
            proxy = EgressProxy(egress, egress.proxy_credentials)
            address = await nursery.start(proxy.run)
            credential = egress.proxy_credentials.issue(TENANT, "tool-agent", "run-1")
            yield Proxied(egress, upstream, credential, address)
            nursery.cancel_scope.cancel()


async def test_plain_requests_go_through_the_policy_and_are_audited(tmp_path: Path) -> None:
    async with proxied(tmp_path) as p, p.client() as client:
        ok = await client.get(f"{p.upstream.base}/echo?x=1")
        assert ok.status_code == 200
        assert json.loads(ok.text)["headers"]["host"] == f"127.0.0.1:{p.upstream.port}"
        assert "proxy-authorization" not in json.loads(ok.text)["headers"]
        gzip = await client.get(f"{p.upstream.base}/gzip")
        assert gzip.text == "hello " * 1000
        redirect = await client.get(f"{p.upstream.base}/redirect?to=/echo")
        assert redirect.status_code == 302  # relayed: the client follows redirects itself
        denied = await client.get("http://169.254.169.254/latest/meta-data/")
        assert denied.status_code == 403
        assert "rule address:metadata" in denied.json()["error"]["message"]
        records = await p.audit()
    assert [r["method"] for r in records] == ["GET", "GET", "GET", "GET"]
    first = records[0]
    assert (first["source"], first["agent"], first["run"]) == ("proxy", "tool-agent", "run-1")
    assert first["path"] == "/echo?x=[redacted]"
    assert records[-1]["rule"] == "address:metadata"


async def test_requests_without_a_valid_credential_are_refused(tmp_path: Path) -> None:
    async with proxied(tmp_path) as p:
        url = f"{p.upstream.base}/echo"
        async with httpx.AsyncClient(proxy=f"http://{p.address[0]}:{p.address[1]}") as client:
            missing = await client.get(url)
        assert missing.status_code == 407
        assert missing.headers["proxy-authenticate"].startswith("Basic")
        forged = ProxyCredential(
            username=p.credential.username, password="wrong", expires=p.credential.expires
        )
        async with p.client(forged) as client:
            assert (await client.get(url)).status_code == 407
        p.egress.proxy_credentials.revoke(p.credential.username)
        async with p.client() as client:
            assert (await client.get(url)).status_code == 407
        assert p.upstream.requests == []


async def test_an_https_target_sent_plain_is_forwarded_over_tls_with_its_secret(
    tmp_path: Path,
) -> None:
    async with proxied(tmp_path, tls=True) as p:
        target = f"https://127.0.0.1:{p.upstream.port}/echo"
        # httpx tunnels https:// URLs with CONNECT; a tool that wants a secret injected sends
        # the https URL in plain form, which is what this raw request does.
        head = await _raw(
            p,
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Authorization: Bearer {{secret:K}}\r\n",
        )
        status, headers, body = head
        assert status == 200
        assert p.upstream.headers[-1]["authorization"] == f"Bearer {VALUE}"
        assert VALUE.encode() not in body
        assert headers[b"x-echo-authorization"] == b"Bearer [REDACTED:K]"
        unbound = await _raw(
            p,
            f"GET http://localhost:{p.upstream.port}/echo HTTP/1.1\r\nHost: localhost\r\n"
            "Authorization: {{secret:K}}\r\n",
        )
        assert unbound[0] == 403
        assert b"rule secret:K" in unbound[2]


async def test_connect_tunnels_are_decided_by_host_and_port(tmp_path: Path) -> None:
    async with proxied(tmp_path) as p:
        port = p.upstream.port
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            unused = sock.getsockname()[1]
        denied = await _connect(p, f"127.0.0.1:{unused}")
        assert denied[0] == 403
        method_limited = await _connect(p, f"methods.test:{port}")
        assert method_limited[0] == 403  # its only rule limits methods: no tunnel
        assert b"tunnel needs a rule" in method_limited[2]
        status, stream = await _open_tunnel(p, f"127.0.0.1:{port}")
        assert status == 200
        async with stream:
            request = f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            await stream.send_all(request.encode())
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        with trio.fail_after(10):  # the proxy completes the record once the tunnel closes
            while (records := await p.audit())[-1]["error"] is not None:
                await trio.sleep(0.01)
    tunnel = records[-1]
    assert (tunnel["method"], tunnel["decision"], tunnel["status"]) == ("CONNECT", "allowed", 200)
    assert tunnel["bytes_out"] > 0
    assert tunnel["bytes_in"] == len(received)
    assert [r["decision"] for r in records[:2]] == ["denied", "denied"]


def _authorization(p: Proxied) -> str:
    pair = f"{p.credential.username}:{p.credential.password}".encode()
    return "Proxy-Authorization: Basic " + base64.b64encode(pair).decode() + "\r\n"


async def _raw(p: Proxied, head: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request head (plus credential) to the proxy; parse the answer with h11."""
    stream = await trio.open_tcp_stream(*p.address)
    async with stream:
        await stream.send_all((head + _authorization(p) + "\r\n").encode())
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body


async def _connect(p: Proxied, authority: str) -> tuple[int, dict[bytes, bytes], bytes]:
    return await _raw(p, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n")


async def _open_tunnel(p: Proxied, authority: str) -> tuple[int, trio.SocketStream]:
    stream = await trio.open_tcp_stream(*p.address)
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n" + _authorization(p) + "\r\n"
    await stream.send_all(head.encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some(1)  # byte by byte: nothing past the head
    return int(received.split(b" ")[1]), stream


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "10.0.0.1:7422", "nonsense", "[::]:1"])
def test_the_proxy_listens_on_loopback_only(listen: str) -> None:
    with pytest.raises(ValidationError, match="loopback"):
        EgressConfig(proxy_listen=listen)
    assert EgressConfig(proxy_listen="[::1]:0").proxy_listen == "[::1]:0"


async def test_malformed_and_origin_form_requests_are_refused(tmp_path: Path) -> None:
    async with proxied(tmp_path) as p:
        origin_form = await _raw(p, "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert origin_form[0] == 400
        bad_connect = await _raw(p, "CONNECT nohost HTTP/1.1\r\nHost: x\r\n")
        assert bad_connect[0] == 400
        assert p.upstream.requests == []


async def test_the_daemon_serves_the_proxy_when_configured(tmp_path: Path) -> None:
    from tests.server.test_http import serve

    async with (
        serve_upstream() as upstream,
        serve(tmp_path, **{"egress.proxy_listen": "127.0.0.1:0"}) as served,
    ):
        await served.create_tenant(TENANT)
        policy = local_policy(upstream.port).to_json()
        route = f"/v1/admin/tenants/{TENANT}/egress"
        assert (await served.client.put(route, json=policy, headers=served.admin())).is_success
        egress, address = served.daemon.egress, served.info.proxy_address
        assert egress is not None
        assert address is not None
        credential = egress.proxy_credentials.issue(TENANT, "a", "r")
        async with httpx.AsyncClient(proxy=credential.url(*address), trust_env=False) as client:
            assert (await client.get(f"{upstream.base}/echo")).status_code == 200


async def test_a_request_head_trickled_in_is_cut_off_by_one_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with proxied(tmp_path) as p:
        stream = await trio.open_tcp_stream(*p.address)
        async with stream:
            started = trio.current_time()
            await stream.send_all(b"GET http://127.0.0.1/echo HTTP/1.1\r\n")
            closed = False
            with trio.fail_after(10 * IDLE_SECONDS):
                while not closed:
                    await trio.sleep(IDLE_SECONDS / 3)  # each read well inside its own timer
                    try:
                        await stream.send_all(b"X-Slow: 1\r\n")
                        with trio.move_on_after(0.1):
                            closed = await stream.receive_some(1024) == b""
                    except trio.BrokenResourceError:
                        closed = True
            assert trio.current_time() - started <= IDLE_SECONDS + IDLE_SECONDS / 3 + 1
        assert p.upstream.requests == []
