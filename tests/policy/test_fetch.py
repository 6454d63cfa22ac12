"""``self.fetch`` end to end: a real runtime, a real egress layer and a real HTTP server on
loopback standing in for an external API (reached through explicit address rules).

The SSRF matrix: each denied address family, decimal/octal/hex IP spellings, a host name that
resolves to a private address, a redirect from an allowed host to a denied one, oversized and
slow responses. Every denial must be a ``policy_violation`` naming the deciding rule, audited,
and never reach the server.
"""

from __future__ import annotations

import contextlib
import json
import tracemalloc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import trio

from facetrt import (
    BadRequestError,
    FetchError,
    HandlerError,
    PolicyViolationError,
    Runtime,
    RuntimeConfig,
    open_runtime,
)
from facetrt.policy import Egress, EgressConfig, EgressPolicy, open_egress
from facetrt.policy._transport import resolve
from facetrt.storage import StoreHooks
from tests.facets import CLASSES
from tests.policy.upstream import Upstream, serve_upstream
from tests.runtime.test_turns import CommitValve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

TENANT = "acme"
CONFIG = RuntimeConfig(mailbox_envelopes_max=64, open_facets_max=8, commit_threads=4)


def local_policy(port: int, **extra: Any) -> EgressPolicy:
    """Allow the loopback upstream by IP and by name, through explicit address rules."""
    literals = ["127.0.0.2", "::1", "::ffff:127.0.0.2", "169.254.169.254", "fd00:ec2::254"]
    literals += ["10.0.0.1", "100.64.0.1", "169.254.1.1", "224.0.0.1", "0.0.0.0", "fe80::1"]
    return EgressPolicy.parse(
        {
            "allow": [
                {"host": "127.0.0.1", "schemes": ["http"], "ports": [port]},
                {"name": "by-name", "host": "localhost", "schemes": ["http"], "ports": [port]},
                {"host": "rebind.test", "schemes": ["http"], "ports": [port]},
                *({"host": h, "schemes": ["http"], "ports": [port, 80]} for h in literals),
            ],
            "addresses": [
                {"name": "upstream", "address": "127.0.0.1", "ports": [port]},
                {"name": "upstream6", "address": "::1", "ports": [port]},
            ],
            **extra,
        }
    )


@dataclass
class Setup:
    rt: Runtime
    egress: Egress
    upstream: Upstream

    async def fetch(self, path: str, agent: str = "f", **kwargs: Any) -> dict[str, Any]:
        url = self.upstream.base + path if path.startswith("/") else path
        result = await self.rt.call(TENANT, agent, "request", url, cls="Fetcher", **kwargs)
        assert isinstance(result, dict)
        return result

    async def audit(self, tenant: str = TENANT) -> list[dict[str, Any]]:
        records, _ = await self.egress.audit.read(tenant, since=None, after=None, limit=1000)
        return records


@contextlib.asynccontextmanager
async def setup(
    data_dir: Path,
    *,
    config: EgressConfig | None = None,
    policy: Callable[[int], EgressPolicy] = local_policy,
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
    hooks: StoreHooks | None = None,
) -> AsyncIterator[Setup]:
    async with (
        serve_upstream() as upstream,
        open_egress(
            data_dir,
            config=config,
            policies={TENANT: policy(upstream.port)},
            resolver=resolver or resolve,
        ) as egress,
        open_runtime(
            data_dir, classes=CLASSES, config=CONFIG, egress=egress, store_hooks=hooks
        ) as rt,
    ):
        yield Setup(rt, egress, upstream)


async def test_fetch_returns_the_response_and_audits_the_attempt(data_dir: Path) -> None:
    async with setup(data_dir) as s:
        result = await s.fetch("/echo?token=abc&x=1", method="POST", json={"a": [1, 2]})
        assert result["status"] == 200
        echoed = json.loads(result["text"])
        assert echoed["method"] == "POST"
        assert echoed["body"] == '{"a":[1,2]}'
        assert echoed["headers"]["content-type"] == "application/json"
        assert echoed["headers"]["host"] == f"127.0.0.1:{s.upstream.port}"
        assert ["content-type", "application/json"] in result["headers"]
        gzip = await s.fetch("/gzip")
        assert gzip["text"] == "hello " * 1000  # decoded
        records = await s.audit()
    assert [r["path"] for r in records] == ["/echo?token=[redacted]&x=[redacted]", "/gzip"]
    first = records[0]
    assert first["decision"] == "allowed"
    assert first["rule"] == "allow[0]"
    assert first["agent"] == "f"
    assert first["source"] == "fetch"
    assert first["status"] == 200
    assert first["address"] == "127.0.0.1"
    assert first["bytes_out"] == len('{"a":[1,2]}')
    assert first["bytes_in"] > 0
    assert first["error"] is None
    assert first["latency_seconds"] >= 0
    assert len(first["run"]) == 16
    assert records[1]["run"] != first["run"]  # one run per message


async def test_everything_is_denied_by_default(data_dir: Path) -> None:
    async with setup(data_dir, policy=lambda port: EgressPolicy()) as s:
        with pytest.raises(PolicyViolationError, match="rule default-deny"):
            await s.fetch("/echo")
        assert s.upstream.requests == []
        (record,) = await s.audit()
    assert (record["decision"], record["rule"], record["error"]) == (
        "denied",
        "default-deny",
        "policy_violation",
    )


DENIED = {
    "http://2130706433:{port}/": "host-syntax",
    "http://0x7f.0.0.1:{port}/": "host-syntax",
    "http://0x7f000001:{port}/": "host-syntax",
    "http://127.1:{port}/": "host-syntax",
    "http://0177.0.0.1:{port}/": "url-syntax",
    "http://user@127.0.0.1:{port}/": "url-userinfo",
    "http://127.0.0.2:{port}/": "address:loopback",
    "http://[::ffff:127.0.0.2]:{port}/": "address:loopback",
    "http://169.254.169.254/latest/meta-data/": "address:metadata",
    "http://[fd00:ec2::254]/": "address:metadata",
    "http://10.0.0.1/": "address:private",
    "http://100.64.0.1/": "address:cgnat",
    "http://169.254.1.1/": "address:link_local",
    "http://[fe80::1]/": "address:link_local",
    "http://224.0.0.1/": "address:multicast",
    "http://0.0.0.0:{port}/": "address:unspecified",
    "http://127.0.0.1:{port}/%2e%2e/admin": "path-syntax",
    "https://127.0.0.1:{port}/": "default-deny",
    "ftp://127.0.0.1:{port}/": "scheme",
    "http://example.com/": "default-deny",
}


async def test_the_ssrf_matrix_is_denied_before_anything_is_sent(data_dir: Path) -> None:
    async with setup(data_dir) as s:
        for template, rule in DENIED.items():
            url = template.format(port=s.upstream.port)
            with pytest.raises(PolicyViolationError, match=f"rule {rule}") as caught:
                await s.fetch(url)
            assert caught.value.code == "policy_violation"
        assert s.upstream.requests == []
        records = await s.audit()
    assert len(records) == len(DENIED)
    assert all(r["decision"] == "denied" for r in records)


async def test_a_name_resolving_to_loopback_is_denied_without_an_address_rule(
    data_dir: Path,
) -> None:
    def by_name_only(port: int) -> EgressPolicy:
        return EgressPolicy.parse(
            {"allow": [{"host": "localhost", "schemes": ["http"], "ports": [port]}]}
        )

    async with setup(data_dir, policy=by_name_only) as s:
        with pytest.raises(PolicyViolationError, match="rule address:loopback"):
            await s.fetch(f"http://localhost:{s.upstream.port}/echo")
        assert s.upstream.requests == []


async def test_a_redirect_to_a_denied_address_is_denied_at_that_hop(data_dir: Path) -> None:
    async with setup(data_dir) as s:
        target = "http://169.254.169.254/latest/meta-data/"
        with pytest.raises(PolicyViolationError, match="rule address:metadata"):
            await s.fetch(f"/redirect?to={target}")
        assert s.upstream.requests == [("GET", "/redirect")]
        records = await s.audit()
    assert [(r["decision"], r["status"]) for r in records] == [("allowed", 302), ("denied", None)]


async def test_redirects_are_followed_and_bounded(data_dir: Path) -> None:
    async with setup(data_dir, config=EgressConfig(redirects_max=2)) as s:
        base = s.upstream.base
        result = await s.fetch(f"/redirect?to={base}/echo&status=303", method="POST", body="x")
        assert json.loads(result["text"])["method"] == "GET"  # 303: see other, with GET
        assert result["url"] == f"{base}/echo"
        loop = f"/redirect?to={base}/redirect%3Fto%3D{base}/redirect%253Fto%253D{base}/echo"
        with pytest.raises(PolicyViolationError, match="rule limit:redirects_max"):
            await s.fetch(loop)


async def test_oversized_and_slow_responses_are_cut(data_dir: Path) -> None:
    config = EgressConfig(response_bytes_max=100_000, request_seconds_max=0.5)
    async with setup(data_dir, config=config) as s:
        assert len((await s.fetch("/big?bytes=100000"))["text"]) == 100_000
        with pytest.raises(PolicyViolationError, match="rule limit:response_bytes_max"):
            await s.fetch("/big?bytes=1000000")
        with pytest.raises(PolicyViolationError, match="rule limit:request_seconds_max"):
            await s.fetch("/hang")
        records = await s.audit()
    assert [r["error"] for r in records] == [None, "policy_violation", "timeout"]


@pytest.mark.slow
async def test_a_compressed_body_is_decoded_in_bounded_pieces(data_dir: Path) -> None:
    """Goal: a compression bomb cannot make egress hold much more than the response limit.
    Method: 64 MiB of zeros, gzip-encoded (64 KiB on the wire), against a 1 MiB limit; the
    peak of traced memory during the fetch stays far below the decoded size (httpx decodes
    a whole network read at once, and stacks decoders for ``gzip, gzip``)."""
    config = EgressConfig(response_bytes_max=1 << 20)
    async with setup(data_dir, config=config) as s:
        tracemalloc.start()
        try:
            with pytest.raises(PolicyViolationError, match="rule limit:response_bytes_max"):
                await s.fetch(f"/bomb?bytes={64 << 20}")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20
        assert (await s.fetch("/bomb?bytes=1000"))["text"] == "\0" * 1000  # decoded


async def test_a_response_over_the_limit_is_not_read_further(data_dir: Path) -> None:
    """Goal: the response limit stops reading, rather than draining (and discarding) the rest
    until the body ends or the time limit passes. Method: a body that passes the limit and
    then never ends; the fetch fails on the size limit, not the time limit."""
    config = EgressConfig(response_bytes_max=100_000, request_seconds_max=5)
    async with setup(data_dir, config=config) as s:
        with pytest.raises(PolicyViolationError, match="rule limit:response_bytes_max"):
            await s.fetch("/big-then-hang?bytes=200000")


async def test_only_one_gzip_or_deflate_coding_is_decoded_and_egress_asks_for_them(
    data_dir: Path,
) -> None:
    """Stacked codings (a bomb amplifier) and bodies that are not what their coding says are
    FetchErrors; egress sets Accept-Encoding itself, so a server never picks a coding whose
    body egress could not decode and redact."""
    async with setup(data_dir) as s:
        with pytest.raises(HandlerError, match="FetchError: stacked content codings"):
            await s.fetch("/bomb?bytes=1000&layers=2")
        with pytest.raises(HandlerError, match="FetchError: undecodable gzip body"):
            await s.fetch("/bad-gzip")
        echoed = json.loads((await s.fetch("/echo", headers={"Accept-Encoding": "br"}))["text"])
        assert echoed["headers"]["accept-encoding"] == "gzip, deflate"
        records = await s.audit()
    assert [r["error"] for r in records] == ["protocol", "protocol", None]


async def test_the_connection_goes_to_the_address_that_was_checked(data_dir: Path) -> None:
    """Goal: a rebinding DNS server cannot move the connection after the check. Method: a
    resolver that answers loopback (allowed) once and a private address afterwards; the fetch
    succeeds against loopback and the name was resolved exactly once."""
    lookups: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else ["10.0.0.1"]

    async with setup(data_dir, resolver=rebinding) as s:
        result = await s.fetch(f"http://rebind.test:{s.upstream.port}/echo")
        assert json.loads(result["text"])["headers"]["host"] == f"rebind.test:{s.upstream.port}"
        assert lookups == ["rebind.test"]
        with pytest.raises(PolicyViolationError, match="rule address:private"):
            await s.fetch(f"http://rebind.test:{s.upstream.port}/echo")
        assert s.upstream.requests == [("GET", "/echo")]


async def test_a_mixed_dns_answer_is_denied(data_dir: Path) -> None:
    async def mixed(host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        return ["127.0.0.1", "169.254.169.254"]

    async with setup(data_dir, resolver=mixed) as s:
        with pytest.raises(PolicyViolationError, match="rule address:metadata"):
            await s.fetch(f"http://rebind.test:{s.upstream.port}/echo")
        assert s.upstream.requests == []


async def test_a_policy_change_applies_to_the_next_call(data_dir: Path) -> None:
    async with setup(data_dir, policy=lambda port: EgressPolicy()) as s:
        with pytest.raises(PolicyViolationError):
            await s.fetch("/echo")
        s.egress.policies.set(TENANT, local_policy(s.upstream.port))
        assert (await s.fetch("/echo"))["status"] == 200
        s.egress.policies.set(TENANT, None)
        with pytest.raises(PolicyViolationError):
            await s.fetch("/echo")


async def test_fetch_waits_until_earlier_writes_are_durable(data_dir: Path) -> None:
    """Goal: the output gate holds for fetch as for facet calls. Method: hold the commit of a
    finished message; a fetch in the next message must not reach the server until it is
    released."""
    valve = CommitValve(data_dir, "f")
    async with setup(data_dir, hooks=StoreHooks(before_commit=valve)) as s:
        await s.rt.call(TENANT, "f", "put", "warm", 1, cls="Fetcher")
        valve.hold()
        results: dict[str, object] = {}
        async with trio.open_nursery() as nursery:

            async def put() -> None:
                results["put"] = await s.rt.call(TENANT, "f", "put", "k", 1)

            async def fetch() -> None:
                results["fetch"] = (await s.fetch("/echo"))["status"]

            nursery.start_soon(put)
            await valve.wait_entered()
            nursery.start_soon(fetch)
            await trio.sleep(0.2)  # time for a fetch that did not wait to arrive
            assert s.upstream.requests == []
            valve.release()
        assert results == {"put": None, "fetch": 200}
        assert s.upstream.requests == [("GET", "/echo")]


async def test_credentials_are_dropped_when_a_redirect_changes_origin(data_dir: Path) -> None:
    async with setup(data_dir) as s:
        port = s.upstream.port
        other = f"http://localhost:{port}/echo"
        result = await s.fetch(
            f"/redirect?to={other}", headers={"Authorization": "Basic eDp5", "X-Keep": "1"}
        )
        headers = json.loads(result["text"])["headers"]
        assert "authorization" not in headers
        assert headers["x-keep"] == "1"


async def test_bad_requests_are_refused_before_any_decision(data_dir: Path) -> None:
    async with setup(data_dir) as s:
        with pytest.raises(BadRequestError, match="set by the egress layer"):
            await s.fetch("/echo", headers={"Host": "internal"})
        for value in ("a\r\nX-B: b", "a\x0b", "trailing ", "caf\u00e9"):
            # h11 or httpx would refuse these later, with an error quoting the value.
            with pytest.raises(BadRequestError, match="line break, control character"):
                await s.fetch("/echo", headers={"X-A": value})
        with pytest.raises(BadRequestError, match="not both"):
            await s.fetch("/echo", body="a", json={"b": 1})
        assert s.upstream.requests == []


async def test_network_failures_are_fetch_errors(data_dir: Path) -> None:
    async def nowhere(host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        return ["127.0.0.1"]

    async with setup(data_dir, resolver=nowhere) as s:
        with trio.socket.socket() as sock:  # a port nobody listens on
            await sock.bind(("127.0.0.1", 0))
            closed = sock.getsockname()[1]
        s.egress.policies.set(TENANT, local_policy(closed))
        with pytest.raises(HandlerError, match="FetchError"):
            await s.fetch(f"http://127.0.0.1:{closed}/")
        (record,) = await s.audit()
    assert record["error"] == "connect"


async def test_without_an_egress_gateway_every_fetch_is_denied(data_dir: Path) -> None:
    async with open_runtime(data_dir, classes=CLASSES, config=CONFIG) as rt:
        with pytest.raises(PolicyViolationError, match="rule no-egress"):
            await rt.call(TENANT, "f", "request", "http://127.0.0.1:1/", cls="Fetcher")


async def test_a_name_that_does_not_resolve_is_an_audited_fetch_error(data_dir: Path) -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        raise FetchError(f"cannot resolve {host!r}", kind="dns")

    async with setup(data_dir, resolver=nxdomain) as s:
        with pytest.raises(HandlerError, match=r"FetchError: cannot resolve 'rebind\.test'"):
            await s.fetch(f"http://rebind.test:{s.upstream.port}/")
        (record,) = await s.audit()
    assert (record["decision"], record["error"], record["status"]) == ("allowed", "dns", None)
