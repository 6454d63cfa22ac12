"""The HTTP gateway end to end: a real daemon, real HTTP over loopback, httpx as the client.

Each test starts a daemon on ports chosen by the OS, creates tenants through the admin API
(as an operator would) and checks status codes, error bodies and, for refused calls, that
nothing was written (through the admin inspect route or a later authorized read).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from facetrt.config import load_daemon_config
from facetrt.server._daemon import Daemon, DaemonInfo
from tests.util import wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

    from facetrt import Value

CLASSES = {
    "Counter": "facetrt.examples:Counter",
    "AgentMemory": "facetrt.examples:AgentMemory",
    "Register": "tests.facets:Register",
}
BODY_BYTES_MAX = 4096
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Served:
    daemon: Daemon
    info: DaemonInfo
    admin_key: str
    client: httpx.AsyncClient

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    async def create_tenant(self, tenant: str) -> str:
        response = await self.client.post(
            "/v1/admin/tenants", json={"tenant": tenant}, headers=self.admin()
        )
        assert response.status_code == 201, response.text
        key = response.json()["key"]
        assert isinstance(key, str)
        return key

    async def call(
        self,
        key: str | None,
        path: str,
        body: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POST /v1/facets/<path> with a JSON body (None: no body)."""
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        return await self.client.post(f"/v1/facets/{path}", json=body, headers=all_headers)

    async def inspect(self, path: str) -> httpx.Response:
        return await self.client.get(f"/v1/admin/tenants/{path}", headers=self.admin())


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, **overrides: object) -> AsyncIterator[Served]:
    config = load_daemon_config(
        overrides={
            "data_dir": str(tmp_path / "d"),
            "server.listen": "127.0.0.1:0",
            "server.http": "127.0.0.1:0",
            "server.http_body_bytes_max": BODY_BYTES_MAX,
            "server.auth_failures_free": 1000,  # the auth tests fail on purpose, often
            "runtime.commit_threads": 4,
            "classes": CLASSES,
            **overrides,
        }
    )
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(daemon.run)
        assert info.http_address is not None
        admin_key = info.admin_key_path.read_text().strip()
        host, port = info.http_address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
            yield Served(daemon, info, admin_key, client)
        daemon.stop()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve(tmp_path) as value:
        yield value


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "retryable"} <= set(body["error"])
    assert response.headers["content-type"] == "application/json"
    return response.status_code, body["error"]["code"]


def result_of(response: httpx.Response) -> Value:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"result"}
    value: Value = body["result"]
    return value


# -- health and metrics ------------------------------------------------------------------


async def test_health_routes_need_no_key(served: Served) -> None:
    client = served.client
    healthz = await client.get("/healthz")
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    readyz = await client.get("/readyz")
    assert readyz.status_code == 200
    assert readyz.json()["ready"] is True
    assert readyz.json()["draining"] is False
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "facetrt_facets_open" in metrics.text


async def test_draining_node_is_not_ready_and_refuses_calls_unavailable(served: Served) -> None:
    key = await served.create_tenant("acme")
    health = served.daemon.health
    health.ready, health.draining = False, True
    readyz = await served.client.get("/readyz")
    assert readyz.status_code == 503
    assert (readyz.json()["ready"], readyz.json()["draining"]) == (False, True)
    assert (await served.client.get("/healthz")).status_code == 200
    refused = await served.call(key, "acme/c/increment", {"class": "Counter"})
    assert error_of(refused) == (503, "unavailable")
    assert refused.json()["error"]["retryable"] is True
    assert refused.headers["retry-after"] == "1"
    health.ready, health.draining = True, False
    assert (await served.inspect("acme/facets/c")).status_code == 404  # nothing was called


async def test_readiness_flips_as_soon_as_stop_begins(tmp_path: Path) -> None:
    async with serve(tmp_path) as served:
        assert served.daemon.health.ready
        served.daemon.stop()
        await wait_until(lambda: not served.daemon.health.ready)
        assert served.daemon.health.draining


async def test_metrics_count_http_calls_by_code_and_never_name_tenants(served: Served) -> None:
    key = await served.create_tenant("tenant-zq")
    result_of(await served.call(key, "tenant-zq/agent-zq-77/increment", {"class": "Counter"}))
    await served.call(key, "tenant-zq/agent-zq-78/increment")  # not_found
    await served.call(None, "tenant-zq/agent-zq-77/increment")  # unauthorized
    text = (await served.client.get("/metrics")).text
    assert 'facetrt_calls_total{code="ok",surface="http"} 1.0' in text
    assert 'facetrt_calls_total{code="not_found",surface="http"} 1.0' in text
    assert 'facetrt_calls_total{code="unauthorized",surface="http"} 1.0' in text
    assert 'facetrt_auth_failures_total{surface="http"} 1.0' in text
    assert re.search(r'facetrt_call_duration_seconds_count\{surface="http"\} 3\.0', text)
    assert "zq" not in text


# -- calls -------------------------------------------------------------------------------


async def test_admin_created_tenant_calls_concurrent_increments_exactly(served: Served) -> None:
    key = await served.create_tenant("acme")
    results: list[Value] = []

    async def increment() -> None:
        results.append(result_of(await served.call(key, "acme/c/increment", {"class": "Counter"})))

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(increment)
    counts = [value for value in results if isinstance(value, int)]
    assert sorted(counts) == list(range(1, 41))  # each increment saw a distinct count
    assert result_of(await served.call(key, "acme/c/get")) == 40
    by_kwargs = await served.call(key, "acme/c/increment", {"kwargs": {"by": 2}})
    assert result_of(by_kwargs) == 42
    assert result_of(await served.call(key, "acme/c/increment", {"args": [3]})) == 45


async def test_agent_ids_may_hold_slashes_and_percent_escapes(served: Served) -> None:
    key = await served.create_tenant("acme")
    assert result_of(await served.call(key, "acme/team/a/increment", {"class": "Counter"})) == 1
    assert result_of(await served.call(key, "acme/team%2Fa/increment")) == 2
    inspected = await served.inspect("acme/facets/team/a")
    assert inspected.status_code == 200
    assert inspected.json()["class"] == "Counter"


async def test_idempotency_key_runs_the_handler_once(served: Served) -> None:
    key = await served.create_tenant("acme")
    headers = {"Idempotency-Key": "order-1", "traceparent": TRACEPARENT}
    first = await served.call(key, "acme/c/increment", {"class": "Counter"}, headers)
    second = await served.call(key, "acme/c/increment", {"class": "Counter"}, headers)
    assert result_of(first) == result_of(second) == 1
    assert result_of(await served.call(key, "acme/c/get")) == 1


async def test_bytes_travel_as_base64_markers(served: Served) -> None:
    key = await served.create_tenant("acme")
    raw = bytes(range(256))
    marker = {"$bytes": base64.b64encode(raw).decode()}
    value = {"blob": marker, "list": [marker, "text"], "not bytes": {"$bytes": 5}}
    put = {"args": ["k", value], "class": "Register"}
    assert result_of(await served.call(key, "acme/r/put", put)) is None
    assert result_of(await served.call(key, "acme/r/get", {"args": ["k"]})) == value
    # The facet really receives bytes: adding them to an int names the type.
    as_bytes = await served.call(key, "acme/c/increment", {"args": [marker], "class": "Counter"})
    assert error_of(as_bytes) == (422, "handler_error")
    assert "'bytes'" in as_bytes.json()["error"]["message"]
    bad = await served.call(key, "acme/r/put", {"args": ["k", {"$bytes": "not base64!"}]})
    assert error_of(bad) == (400, "bad_request")


# -- errors ------------------------------------------------------------------------------


async def test_each_runtime_error_code_has_its_status(served: Served) -> None:
    key = await served.create_tenant("acme")
    call = served.call
    result_of(await call(key, "acme/c/increment", {"class": "Counter"}))
    cases: list[tuple[str, dict[str, object] | None, tuple[int, str]]] = [
        ("acme/a%20b/increment", {"class": "Counter"}, (400, "bad_request")),  # bad agent id
        ("acme/c/increment", {"kwargs": {"nope": 1}}, (400, "bad_request")),  # does not bind
        ("acme/missing/increment", None, (404, "not_found")),  # no class, no facet
        ("acme/c/nope", None, (404, "not_found")),  # unknown method
        ("acme/x/get", {"class": "Nope"}, (404, "not_found")),  # unknown class
        ("acme/c/get", {"class": "Register"}, (409, "conflict")),
        ("acme/c/increment", {"kwargs": {"by": "x"}}, (422, "handler_error")),
        (
            "acme/r/call",
            {"args": ["r", "get", ["k"], None], "class": "Register"},
            (409, "reentrancy"),
        ),
    ]
    for path, body, expected in cases:
        response = await call(key, path, body)
        assert error_of(response) == expected, (path, response.text)
        assert response.json()["error"]["retryable"] is False
    handler = await call(key, "acme/c/increment", {"kwargs": {"by": "x"}})
    assert handler.json()["error"]["type"] == "TypeError"
    assert result_of(await call(key, "acme/c/get")) == 1  # no refused call wrote anything


@pytest.mark.slow
async def test_full_store_and_full_mailbox_answer_429(tmp_path: Path) -> None:
    limits = {
        "runtime.map_size_bytes_initial": 64 * 1024,
        "runtime.map_size_bytes_max": 64 * 1024,
        "runtime.mailbox_envelopes_max": 1,
        "server.http_body_bytes_max": 1024 * 1024,
    }
    async with serve(tmp_path, **limits) as served:
        key = await served.create_tenant("acme")
        big = await served.call(
            key, "acme/r/put", {"args": ["k", "v" * 100_000], "class": "Register"}
        )
        assert error_of(big) == (429, "quota_exceeded")
        assert big.json()["error"]["retryable"] is False
        get_k = {"args": ["k"], "class": "Register"}
        assert result_of(await served.call(key, "acme/r/get", get_k)) is None

        answers: list[httpx.Response] = []

        async def get() -> None:
            answers.append(await served.call(key, "acme/r/get", {"args": ["k"]}))

        async with trio.open_nursery() as nursery:
            slow = {"args": [0.8, "slow", 1], "class": "Register"}
            nursery.start_soon(served.call, key, "acme/r/sleep_then_put", slow)
            await trio.sleep(0.15)  # real time: the slow handler now holds the facet
            for _ in range(4):
                nursery.start_soon(get)
        shed = [a for a in answers if a.status_code != 200]
        assert shed
        assert {error_of(a) for a in shed} == {(429, "overloaded")}
        assert all(a.json()["error"]["retryable"] is True for a in shed)


async def test_auth_matrix_refuses_and_writes_nothing(served: Served) -> None:
    acme = await served.create_tenant("acme")
    globex = await served.create_tenant("globex")
    key_id, _, secret = acme.removeprefix("frt_").partition("_")
    wrong_secret = f"frt_{key_id}_{secret[::-1]}"
    revoked = (
        await served.client.post("/v1/admin/tenants/acme/keys", headers=served.admin())
    ).json()
    response = await served.client.delete(
        f"/v1/admin/keys/{revoked['key_id']}", headers=served.admin()
    )
    assert response.status_code == 200
    body = {"class": "Counter"}
    path = "acme/c/increment"
    for headers in (
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {wrong_secret}"},
        {"Authorization": f"Bearer {revoked['key']}"},
    ):
        refused = await served.call(None, path, body, headers)
        assert error_of(refused) == (401, "unauthorized"), headers
        assert refused.headers["www-authenticate"] == "Bearer"
    assert error_of(await served.call(globex, path, body)) == (403, "forbidden")
    assert error_of(await served.call(served.admin_key, path, body)) == (403, "forbidden")
    assert (await served.inspect("acme/facets/c")).status_code == 404
    assert result_of(await served.call(acme, path, body)) == 1
    metrics = (await served.client.get("/metrics")).text
    assert 'facetrt_auth_failures_total{surface="http"} 6.0' in metrics


async def test_bad_bodies_and_headers_are_refused(served: Served) -> None:
    key = await served.create_tenant("acme")
    auth = {"Authorization": f"Bearer {key}"}
    json_type = {**auth, "Content-Type": "application/json"}
    url = "/v1/facets/acme/c/increment"
    post = served.client.post
    for content, headers, expected in [
        (b"{", json_type, (400, "bad_request")),
        (b"[]", json_type, (400, "bad_request")),
        (b'{"args": "x"}', json_type, (400, "bad_request")),
        (b'{"kwargs": []}', json_type, (400, "bad_request")),
        (b'{"class": 5}', json_type, (400, "bad_request")),
        (b'{"cls": "Counter"}', json_type, (400, "bad_request")),
        (b'{"args": [NaN]}', json_type, (400, "bad_request")),
        (b'{"args": ["\\ud800"]}', json_type, (400, "bad_request")),
        # RFC 8259: UTF-8 only (json.loads also reads UTF-16; found by fuzz_http_body.py)
        ('{"class": "Counter"}'.encode("utf-16"), json_type, (400, "bad_request")),
        (b'{"class": "Counter", "args": ["\xff"]}', json_type, (400, "bad_request")),
        (b'{"class": "Counter"}', {**auth, "Content-Type": "text/plain"}, (415, "bad_request")),
        (b'{"class": "Counter"}', auth, (415, "bad_request")),
        (b"{}", {**json_type, "traceparent": "00-abc"}, (400, "bad_request")),
        (b"{}", {**json_type, "Idempotency-Key": ""}, (400, "bad_request")),
    ]:
        response = await post(url, content=content, headers=headers)
        assert error_of(response) == expected, content
    assert error_of(await served.client.get(url, headers=auth)) == (405, "bad_request")
    unknown = await served.client.get("/v1/nothing/here", headers=auth)
    assert error_of(unknown) == (404, "not_found")
    assert (await served.inspect("acme/facets/c")).status_code == 404
    charset = {**auth, "Content-Type": "application/json; charset=utf-8"}
    created = await post(url, content=b'{"class": "Counter"}', headers=charset)
    assert result_of(created) == 1
    with_bom = await post(url, content=b'\xef\xbb\xbf{"class": "Counter"}', headers=json_type)
    assert result_of(with_bom) == 2  # a byte order mark is ignored, as RFC 8259 allows


async def test_oversized_body_is_refused_with_413_and_changes_nothing(served: Served) -> None:
    key = await served.create_tenant("acme")
    padding = "x" * (BODY_BYTES_MAX + 500)
    body = {"args": ["k", padding], "class": "Register"}
    too_big = await served.call(key, "acme/r/put", body)
    assert error_of(too_big) == (413, "bad_request")
    chunked = await served.client.post(
        "/v1/facets/acme/r/put",
        content=_chunks(json.dumps(body).encode()),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert error_of(chunked) == (413, "bad_request")
    assert (await served.inspect("acme/facets/r")).status_code == 404
    # The connection is still usable after a refused body.
    assert (
        result_of(await served.call(key, "acme/r/get", {"args": ["k"], "class": "Register"}))
        is None
    )


async def test_huge_declared_body_is_refused_without_reading_it(served: Served) -> None:
    key = await served.create_tenant("acme")
    assert served.info.http_address is not None
    stream = await trio.open_tcp_stream(*served.info.http_address)
    async with stream:
        head = (
            "POST /v1/facets/acme/r/put HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000\r\n\r\n"
        )
        await stream.send_all(head.encode() + b'{"args": ["k", "')
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk  # until the server closes the connection
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 "
    assert b"connection: close" in rest.lower()
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_request"


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


# -- admin -------------------------------------------------------------------------------


async def test_admin_routes_manage_tenants_keys_and_facets(served: Served) -> None:
    client, admin = served.client, served.admin()
    key = await served.create_tenant("acme")
    tenant_auth = {"Authorization": f"Bearer {key}"}
    assert error_of(await client.get("/v1/admin/tenants")) == (401, "unauthorized")
    assert error_of(await client.get("/v1/admin/tenants", headers=tenant_auth)) == (
        403,
        "forbidden",
    )
    duplicate = await client.post("/v1/admin/tenants", json={"tenant": "acme"}, headers=admin)
    assert error_of(duplicate) == (409, "conflict")
    invalid = await client.post("/v1/admin/tenants", json={"tenant": "ACME!"}, headers=admin)
    assert error_of(invalid) == (400, "bad_request")
    assert error_of(await client.post("/v1/admin/tenants", headers=admin)) == (400, "bad_request")
    await served.create_tenant("globex")
    tenants = await client.get("/v1/admin/tenants", headers=admin)
    assert tenants.json()["tenants"] == ["acme", "globex"]

    second = await client.post("/v1/admin/tenants/acme/keys", headers=admin)
    assert second.status_code == 201
    assert set(second.json()) == {"tenant", "key_id", "key"}
    keys = (await client.get("/v1/admin/tenants/acme/keys", headers=admin)).json()["keys"]
    assert [set(record) for record in keys] == [{"key_id", "tenant", "created", "revoked"}] * 2
    assert key not in json.dumps(keys)
    missing = await client.get("/v1/admin/tenants/nobody/keys", headers=admin)
    assert error_of(missing) == (404, "not_found")
    assert error_of(await client.delete("/v1/admin/keys/0000", headers=admin)) == (404, "not_found")
    admin_id = served.admin_key.removeprefix("frt_").partition("_")[0]
    last_admin = await client.delete(f"/v1/admin/keys/{admin_id}", headers=admin)
    assert error_of(last_admin) == (409, "conflict")

    for agent in ("b", "a", "team/c"):
        path = f"acme/{agent}/increment"
        result_of(await served.call(key, path, {"class": "Counter"}))
    page = (await client.get("/v1/admin/tenants/acme/facets?limit=2", headers=admin)).json()
    assert len(page["facets"]) == 2
    assert page["next_cursor"] is not None
    rest = await client.get(
        "/v1/admin/tenants/acme/facets", params={"cursor": page["next_cursor"]}, headers=admin
    )
    listed = page["facets"] + rest.json()["facets"]
    assert sorted(row["agent"] for row in listed) == ["a", "b", "team/c"]
    assert {row["class"] for row in listed} == {"Counter"}
    assert rest.json()["next_cursor"] is None
    bad_limit = await client.get("/v1/admin/tenants/acme/facets?limit=0", headers=admin)
    assert error_of(bad_limit) == (400, "bad_request")
    assert error_of(await served.inspect("acme/facets/zzz")) == (404, "not_found")

    wrong_method = await client.put("/v1/admin/tenants", headers=admin)
    assert error_of(wrong_method) == (405, "bad_request")
    assert wrong_method.headers["allow"] == "GET, POST"
    assert error_of(await client.get("/v1/admin/nothing", headers=admin)) == (404, "not_found")

    deleted = await client.delete("/v1/admin/tenants/acme", headers=admin)
    assert deleted.json() == {"tenant": "acme", "revoked_keys": 2, "deleted_facets": 3}
    gone = await served.call(key, "acme/a/get")
    assert error_of(gone) == (401, "unauthorized")
    again = await client.delete("/v1/admin/tenants/acme", headers=admin)
    assert error_of(again) == (404, "not_found")
