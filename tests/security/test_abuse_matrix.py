"""The isolation and abuse matrix (issue 5, point 6): one case per row, over the real surfaces.

Each row starts a daemon (real TCP and HTTP on loopback, small limits, tenants ``acme`` and
``globex``, the facet ``acme/c`` holding 1), sends one hostile thing the way an attacker would
(raw bytes: no client library, no URL normalisation), and checks three things:

1. **the right answer**: the SPEC §4 code with its retryable flag and, over HTTP, its status;
   for protocol-level abuse (slow or oversized input, floods) the connection is closed;
2. **nothing written**: every file and directory under ``tenants/`` (and the size of each
   store's data file) and the system store's tenants and keys are as they were;
3. **the node stays up**: afterwards a normal call succeeds over TCP and over HTTP, and the
   counter shows the row did not increment it (2, then 3).

``docs/reliability.md`` section 6 lists every row (checked by the last test here).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import pytest
import trio

from facetrt._errors import ERROR_CLASSES, ErrorCode
from facetrt.protocol._framing import encode_frame
from tests.security.surfaces import (
    CONNECTIONS_MAX,
    FRAME_BYTES_MAX,
    Node,
    Seen,
    TcpProbe,
    frame_filler,
    handshake_seen,
    http_request,
    http_seen,
    parse_response,
    read_to_end,
    running_node,
    trickled,
    written,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from facetrt import Value

    Probe = Callable[[Node], Awaitable[Seen]]

REPO = Path(__file__).resolve().parents[2]
SLOW_SECONDS = 0.3  # the deadlines of the slow-loris rows (handshake, frame, keep-alive)
TRICKLE_SECONDS = 0.05  # one byte this often: each byte well within the deadline, the whole not


@dataclass(frozen=True, slots=True, kw_only=True)
class Expect:
    """A SPEC §4 code (its retryable flag follows from it), an HTTP status, a close."""

    code: str | None
    status: int | None = None
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    probe: Probe
    expect: Expect
    overrides: Mapping[str, object] = field(default_factory=dict)


def bad_request(status: int | None = None, *, closed: bool = False) -> Expect:
    return Expect(code="bad_request", status=status, closed=closed)


# -- probes ----------------------------------------------------------------------------------


def tcp_call(agent: str, method: str = "increment", *args: Value, **options: object) -> Probe:
    """acme calls ``agent`` over TCP."""

    async def probe(node: Node) -> Seen:
        client = await TcpProbe.welcomed(node)
        return await client.call(agent, method, *args, **options)

    return probe


def tcp_as(tenant: str, agent: str, method: str) -> Probe:
    async def probe(node: Node) -> Seen:
        client = await TcpProbe.welcomed(node, tenant)
        return await client.call(agent, method)

    return probe


def tcp_frame(body: Mapping[str, object], *, welcomed: bool = True) -> Probe:
    """A frame built by hand, after the handshake (or instead of it)."""

    async def probe(node: Node) -> Seen:
        if welcomed:
            client = await TcpProbe.welcomed(node)
        else:
            client = TcpProbe(await node.tcp())
        return await client.send_body(body)

    return probe


def tcp_bytes(data: bytes) -> Probe:
    """Raw bytes after the handshake (bad lengths, undecodable bodies)."""

    async def probe(node: Node) -> Seen:
        client = await TcpProbe.welcomed(node)
        await client.stream.send_all(data)
        return await client.seen()

    return probe


def tcp_key(make: Callable[[dict[str, str]], str]) -> Probe:
    async def probe(node: Node) -> Seen:
        return await handshake_seen(node, make(node.keys))

    return probe


async def tcp_admin_key(node: Node) -> Seen:
    return await handshake_seen(node, node.admin_key)


def http_call(
    path: str,
    body: bytes | None = b'{"class": "Counter"}',
    *,
    tenant: str = "acme",
    headers: Mapping[str, str] | None = None,
) -> Probe:
    """acme (or ``tenant``) posts to ``path`` exactly as written."""

    async def probe(node: Node) -> Seen:
        request = http_request(path, node.keys[tenant], body, headers=headers)
        return await http_seen(node, request)

    return probe


def http_key(make: Callable[[dict[str, str]], bytes | None]) -> Probe:
    """POST acme/c/increment with the Authorization header ``make`` builds (None: absent)."""

    async def probe(node: Node) -> Seen:
        authorization = make(node.keys)
        request = http_request(
            "/v1/facets/acme/c/increment",
            None,
            raw_authorization=authorization,
        )
        return await http_seen(node, request)

    return probe


def http_admin_key(node_key: Callable[[Node], str], path: str, body: bytes) -> Probe:
    async def probe(node: Node) -> Seen:
        return await http_seen(node, http_request(path, node_key(node), body))

    return probe


def create_tenant(name: str) -> Probe:
    """The operator creates a tenant with this name (through the admin API)."""
    payload = json.dumps({"tenant": name}).encode()

    async def probe(node: Node) -> Seen:
        return await http_seen(node, http_request("/v1/admin/tenants", node.admin_key, payload))

    return probe


def bearer(make: Callable[[dict[str, str]], str]) -> Callable[[dict[str, str]], bytes]:
    return lambda keys: b"Bearer " + make(keys).encode()


def forged_secret(keys: dict[str, str]) -> str:
    key_id, secret = keys["acme"].removeprefix("frt_").split("_", 1)
    forged = "A" * 43 if secret != "A" * 43 else "B" * 43
    return f"frt_{key_id}_{forged}"


def swapped_id(keys: dict[str, str]) -> str:
    """globex's key id with acme's secret."""
    globex_id = keys["globex"].removeprefix("frt_").split("_", 1)[0]
    return f"frt_{globex_id}_{keys['acme'].rsplit('_', 1)[1]}"


# -- slow senders and floods -------------------------------------------------------------------


async def tcp_silent(node: Node) -> Seen:
    """Connect and send nothing: the handshake deadline closes it."""
    stream = await node.tcp()
    return parse_tcp_end(await read_to_end(stream))


async def tcp_hello_trickled(node: Node) -> Seen:
    stream = await node.tcp()
    hello = encode_frame({"t": "hello", "v": 1, "key": node.keys["acme"]})
    received, _ = await trickled(stream, b"", hello, TRICKLE_SECONDS)
    return parse_tcp_end(received)


async def tcp_frame_trickled(node: Node) -> Seen:
    client = await TcpProbe.welcomed(node)
    call = encode_frame({"t": "call", "id": 1, "agent": "c", "method": "increment"})
    received, _ = await trickled(client.stream, b"", call, TRICKLE_SECONDS)
    return parse_tcp_end(received)


def parse_tcp_end(received: bytes) -> Seen:
    """Bytes the server sent before closing: nothing at all is a plain close."""
    if not received:
        return Seen(closed=True)
    (length,) = struct.unpack_from(">I", received)
    body = msgpack.unpackb(received[4 : 4 + length])
    return Seen(code=body.get("code"), retryable=body.get("retryable"), closed=True)


async def http_silent(node: Node) -> Seen:
    stream = await node.http()
    return parse_response(await read_to_end(stream))


async def http_head_trickled(node: Node) -> Seen:
    stream = await node.http()
    request = http_request("/v1/facets/acme/c/increment", node.keys["acme"])
    received, _ = await trickled(stream, b"", request, TRICKLE_SECONDS)
    return parse_response(received)


async def http_body_trickled(node: Node) -> Seen:
    stream = await node.http()
    body = b'{"class": "Counter", "kwargs": {"by": 1}}' + b" " * 200
    request = http_request("/v1/facets/acme/c/increment", node.keys["acme"], body)
    head = request[: len(request) - len(body)]
    received, _ = await trickled(stream, head, body, TRICKLE_SECONDS)
    return parse_response(received)


async def http_chunked_too_large(node: Node) -> Seen:
    stream = await node.http()
    head = http_request("/v1/facets/acme/c/increment", node.keys["acme"], None)
    head = head[:-2] + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 1000
    data = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8)) + b"0\r\n\r\n"
    await stream.send_all(head + data)
    return parse_response(await read_to_end(stream))


async def tcp_flood(node: Node, *, welcomed: bool) -> Seen:
    """Hold ``connections_max`` connections, then open one more."""
    for _ in range(CONNECTIONS_MAX):
        if welcomed:
            await TcpProbe.welcomed(node)
        else:
            await node.tcp()
    await _wait_open(node, "tcp", CONNECTIONS_MAX)
    stream = await node.tcp()
    await stream.send_all(encode_frame({"t": "hello", "v": 1, "key": node.keys["acme"]}))
    return parse_tcp_end(await read_to_end(stream))


async def tcp_flood_welcomed(node: Node) -> Seen:
    return await tcp_flood(node, welcomed=True)


async def tcp_flood_silent(node: Node) -> Seen:
    return await tcp_flood(node, welcomed=False)


async def tcp_flood_silent_expires(node: Node) -> Seen:
    """Silent connections hold their slots only until the handshake deadline."""
    for _ in range(CONNECTIONS_MAX):
        await node.tcp()
    await _wait_open(node, "tcp", CONNECTIONS_MAX)
    await _wait_open(node, "tcp", 0)  # cut by handshake_seconds
    client = await TcpProbe.welcomed(node)
    return await client.call("c", "get")


async def http_flood(node: Node, *, keep_alive: bool) -> Seen:
    for _ in range(CONNECTIONS_MAX):
        stream = await node.http()
        if keep_alive:  # one answered request each, then idle
            request = http_request("/v1/facets/acme/c/get", node.keys["acme"], None)
            await stream.send_all(request.replace(b"Connection: close", b"Connection: keep-alive"))
            assert b" 200 " in await stream.receive_some(65536)
    await _wait_open(node, "http", CONNECTIONS_MAX)
    return await http_call("/v1/facets/acme/c/increment")(node)


async def http_flood_silent(node: Node) -> Seen:
    return await http_flood(node, keep_alive=False)


async def http_flood_keep_alive(node: Node) -> Seen:
    return await http_flood(node, keep_alive=True)


async def _wait_open(node: Node, surface: str, count: int) -> None:
    with trio.fail_after(10):
        while node.connections_open(surface) != count:
            await trio.sleep(0.01)


# -- the matrix ------------------------------------------------------------------------------

SLOW_TCP = {"server.handshake_seconds": SLOW_SECONDS, "server.frame_seconds": 60.0}
SLOW_FRAME = {"server.frame_seconds": SLOW_SECONDS}
SLOW_HTTP = {"server.http_keep_alive_seconds": SLOW_SECONDS}
FLOOD_EXPIRES = {"server.handshake_seconds": 0.5}


CALL = {"t": "call", "id": 1, "agent": "c", "method": "increment", "args": [], "kwargs": {}}
HUGE_AGENT = frame_filler(CALL, "agent")  # valid characters, far too long, echoed in the error
HUGE_METHOD = frame_filler(CALL, "method")

ROWS: list[Row] = [
    # ids with path tricks
    Row("tcp-agent-dotdot", tcp_call(".."), bad_request()),
    Row("tcp-agent-dotdot-slash", tcp_call("../c"), bad_request()),
    Row("tcp-agent-absolute-path", tcp_call("/etc/passwd"), bad_request()),
    Row("tcp-agent-backslash", tcp_call("..\\c"), bad_request()),
    Row("tcp-agent-nul", tcp_call("c\x00"), bad_request()),
    Row("tcp-agent-newline", tcp_call("c\n"), bad_request()),
    Row("tcp-agent-escape-sequence", tcp_call("c\x1b[2J"), bad_request()),
    Row("tcp-agent-del", tcp_call("c\x7f"), bad_request()),
    Row("tcp-agent-percent-encoded", tcp_call("%2e%2e"), bad_request()),
    Row("tcp-agent-leading-dot", tcp_call(".c"), bad_request()),
    Row("tcp-agent-empty", tcp_call(""), bad_request()),
    Row(
        "tcp-agent-not-a-string",
        tcp_frame({"t": "call", "id": 1, "agent": 5, "method": "get"}),
        bad_request(closed=True),
    ),
    Row("http-path-dotdot", http_call("/v1/facets/acme/../c/increment"), bad_request(400)),
    Row(
        "http-path-encoded-dotdot", http_call("/v1/facets/acme/%2e%2E/increment"), bad_request(400)
    ),
    Row(
        "http-path-encoded-dotdot-slash",
        http_call("/v1/facets/acme/%2e%2e%2fc/increment"),
        bad_request(400),
    ),
    Row(
        "http-path-encoded-slash",
        http_call("/v1/facets/acme/%2Fetc%2Fpasswd/increment"),
        bad_request(400),
    ),
    Row(
        "http-path-double-slash",
        http_call("/v1/facets/acme//etc/passwd/increment"),
        bad_request(400),
    ),
    Row(
        "http-path-encoded-backslash",
        http_call("/v1/facets/acme/..%5Cc/increment"),
        bad_request(400),
    ),
    Row("http-path-encoded-nul", http_call("/v1/facets/acme/c%00/increment"), bad_request(400)),
    Row(
        "http-path-encoded-crlf",
        http_call("/v1/facets/acme/c%0D%0AX-Injected:%201/increment"),
        bad_request(400),
    ),
    Row("http-path-invalid-utf8", http_call("/v1/facets/acme/c%FF/increment"), bad_request(400)),
    Row("http-path-leading-dot", http_call("/v1/facets/acme/.c/increment"), bad_request(400)),
    Row(
        "http-tenant-dotdot",
        http_call("/v1/facets/../acme/c/increment"),
        Expect(code="forbidden", status=403),
    ),
    Row(
        "http-tenant-encoded-slash",
        http_call("/v1/facets/acme%2Fc/x/increment"),
        Expect(code="forbidden", status=403),
    ),
    # Unicode look-alikes: ids are ASCII, so every look-alike is refused, never normalised
    Row("tcp-agent-cyrillic-es", tcp_call("\u0441"), bad_request()),  # looks like "c"
    Row("tcp-agent-cyrillic-a", tcp_call("\u0430gent"), bad_request()),  # looks like "agent"
    Row("tcp-agent-fullwidth", tcp_call("\uff43"), bad_request()),  # fullwidth "c"
    Row("tcp-agent-nfc", tcp_call("caf\u00e9"), bad_request()),
    Row("tcp-agent-nfd", tcp_call("cafe\u0301"), bad_request()),
    Row("tcp-agent-zero-width", tcp_call("c\u200b"), bad_request()),
    Row("http-agent-cyrillic-es", http_call("/v1/facets/acme/%D1%81/increment"), bad_request(400)),
    Row("http-agent-fullwidth", http_call("/v1/facets/acme/%EF%BD%83/increment"), bad_request(400)),
    Row(
        "http-tenant-cyrillic-a",
        http_call("/v1/facets/%D0%B0cme/c/increment"),
        Expect(code="forbidden", status=403),
    ),
    Row("admin-tenant-cyrillic-a", create_tenant("\u0430cme"), bad_request(400)),
    Row("admin-tenant-fullwidth", create_tenant("\uff41cme"), bad_request(400)),
    Row("admin-tenant-uppercase", create_tenant("ACME"), bad_request(400)),
    # maximum lengths (the lengths at the limit are accepted: test_isolation.py)
    Row("tcp-agent-257-chars", tcp_call("a" * 257), bad_request()),
    Row("tcp-agent-frame-sized", tcp_call(HUGE_AGENT), bad_request()),
    Row("tcp-method-frame-sized", tcp_call("c", HUGE_METHOD), Expect(code="not_found")),
    Row("tcp-idempotency-key-257-bytes", tcp_call("c", idempotency_key="k" * 257), bad_request()),
    Row(
        "http-agent-257-chars",
        http_call(f"/v1/facets/acme/{'a' * 257}/increment"),
        bad_request(400),
    ),
    Row(
        "http-idempotency-key-257-bytes",
        http_call("/v1/facets/acme/c/increment", headers={"Idempotency-Key": "k" * 257}),
        bad_request(400),
    ),
    Row("admin-tenant-64-chars", create_tenant("a" * 64), bad_request(400)),
    # keys of another tenant, revoked, truncated, forged
    Row("tcp-key-other-tenant", tcp_as("globex", "c", "get"), Expect(code="not_found")),
    Row(
        "tcp-key-other-tenant-names-it", tcp_as("globex", "acme/c", "get"), Expect(code="not_found")
    ),
    Row(
        "tcp-key-revoked",
        tcp_key(lambda keys: keys["acme-revoked"]),
        Expect(code="unauthorized", closed=True),
    ),
    Row(
        "tcp-key-truncated",
        tcp_key(lambda keys: keys["acme"][:-1]),
        Expect(code="unauthorized", closed=True),
    ),
    Row("tcp-key-forged-secret", tcp_key(forged_secret), Expect(code="unauthorized", closed=True)),
    Row("tcp-key-swapped-id", tcp_key(swapped_id), Expect(code="unauthorized", closed=True)),
    Row(
        "tcp-key-one-char-longer",
        tcp_key(lambda keys: keys["acme"] + "A"),
        Expect(code="unauthorized", closed=True),
    ),
    Row(
        "tcp-key-non-ascii",
        tcp_key(lambda keys: keys["acme"][:-1] + "\u00e9"),
        Expect(code="unauthorized", closed=True),
    ),
    Row("tcp-key-empty", tcp_key(lambda keys: ""), Expect(code="unauthorized", closed=True)),
    Row(
        "tcp-key-frame-sized",
        tcp_key(lambda keys: "k" * (FRAME_BYTES_MAX - 100)),
        Expect(code="unauthorized", closed=True),
    ),
    Row("tcp-key-admin", tcp_admin_key, Expect(code="forbidden", closed=True)),
    Row(
        "tcp-key-not-a-string",
        tcp_frame({"t": "hello", "v": 1, "key": 5}, welcomed=False),
        bad_request(closed=True),
    ),
    Row(
        "tcp-protocol-version",
        tcp_frame({"t": "hello", "v": 2, "key": "x"}, welcomed=False),
        bad_request(closed=True),
    ),
    Row(
        "tcp-call-before-hello",
        tcp_frame({"t": "call", "id": 1, "agent": "c", "method": "get"}, welcomed=False),
        bad_request(closed=True),
    ),
    Row(
        "http-key-other-tenant",
        http_call("/v1/facets/acme/c/increment", tenant="globex"),
        Expect(code="forbidden", status=403),
    ),
    Row(
        "http-key-revoked",
        http_key(bearer(lambda keys: keys["acme-revoked"])),
        Expect(code="unauthorized", status=401),
    ),
    Row(
        "http-key-truncated",
        http_key(bearer(lambda keys: keys["acme"][:-1])),
        Expect(code="unauthorized", status=401),
    ),
    Row(
        "http-key-forged-secret",
        http_key(bearer(forged_secret)),
        Expect(code="unauthorized", status=401),
    ),
    Row(
        "http-key-swapped-id", http_key(bearer(swapped_id)), Expect(code="unauthorized", status=401)
    ),
    Row(
        "http-key-one-char-longer",
        http_key(bearer(lambda keys: keys["acme"] + "A")),
        Expect(code="unauthorized", status=401),
    ),
    Row(
        "http-key-latin1-byte",
        http_key(lambda keys: b"Bearer " + keys["acme"][:-1].encode() + b"\xe9"),
        Expect(code="unauthorized", status=401),
    ),
    Row(
        "http-key-utf8-bytes",
        http_key(lambda keys: b"Bearer " + keys["acme"][:-1].encode() + "\u00e9".encode()),
        Expect(code="unauthorized", status=401),
    ),
    Row("http-key-missing", http_key(lambda keys: None), Expect(code="unauthorized", status=401)),
    Row(
        "http-key-basic-scheme",
        http_key(lambda keys: b"Basic " + keys["acme"].encode()),
        Expect(code="unauthorized", status=401),
    ),
    Row(
        "http-key-admin-on-facets",
        http_admin_key(lambda node: node.admin_key, "/v1/facets/acme/c/increment", b"{}"),
        Expect(code="forbidden", status=403),
    ),
    Row(
        "http-key-tenant-on-admin",
        http_admin_key(lambda node: node.keys["acme"], "/v1/admin/tenants", b'{"tenant": "evil"}'),
        Expect(code="forbidden", status=403),
    ),
    # slow-loris
    Row("tcp-slow-silent-before-hello", tcp_silent, Expect(code=None, closed=True), SLOW_TCP),
    Row("tcp-slow-hello-trickled", tcp_hello_trickled, Expect(code=None, closed=True), SLOW_TCP),
    Row("tcp-slow-frame-trickled", tcp_frame_trickled, Expect(code=None, closed=True), SLOW_FRAME),
    Row("http-slow-silent-connection", http_silent, Expect(code=None, closed=True), SLOW_HTTP),
    Row("http-slow-head-trickled", http_head_trickled, Expect(code=None, closed=True), SLOW_HTTP),
    Row("http-slow-body-trickled", http_body_trickled, bad_request(400, closed=True), SLOW_FRAME),
    # oversized frames and bodies
    Row(
        "tcp-frame-one-over-limit",
        tcp_bytes(struct.pack(">I", FRAME_BYTES_MAX + 1) + b"\x80"),
        bad_request(closed=True),
    ),
    Row("tcp-frame-4-gib", tcp_bytes(b"\xff\xff\xff\xff"), bad_request(closed=True)),
    Row("tcp-frame-zero-length", tcp_bytes(b"\x00\x00\x00\x00"), bad_request(closed=True)),
    Row(
        "tcp-frame-not-a-map",
        tcp_bytes(struct.pack(">I", 4) + b"\x93\x01\x02\x03"),
        bad_request(closed=True),
    ),
    Row("tcp-frame-undecodable", tcp_bytes(b"\x00\x00\x00\x02\xc1\xc1"), bad_request(closed=True)),
    Row(
        "tcp-hello-over-limit",
        tcp_frame({"t": "hello", "v": 1, "key": "k" * (FRAME_BYTES_MAX + 1)}, welcomed=False),
        bad_request(closed=True),
    ),
    Row("tcp-value-over-limit", tcp_call("c", "increment", "x" * 2000), bad_request()),
    Row(
        "http-body-over-limit",
        http_call("/v1/facets/acme/c/increment", b'{"args": ["' + b"x" * 5000 + b'"]}'),
        bad_request(413, closed=True),
    ),
    Row("http-body-over-limit-chunked", http_chunked_too_large, bad_request(413, closed=True)),
    Row(
        "http-value-over-limit",
        http_call("/v1/facets/acme/c/increment", b'{"args": ["' + b"x" * 2000 + b'"]}'),
        bad_request(400),
    ),
    Row(
        "http-head-over-limit",
        http_call("/v1/facets/acme/c/increment", headers={"X-Padding": "p" * 100_000}),
        Expect(code=None, status=431, closed=True),
    ),
    # connection floods
    Row("tcp-flood-held-connections", tcp_flood_welcomed, Expect(code="overloaded", closed=True)),
    Row("tcp-flood-silent-connections", tcp_flood_silent, Expect(code="overloaded", closed=True)),
    Row(
        "tcp-flood-silent-connections-expire",
        tcp_flood_silent_expires,
        Expect(code=None),
        FLOOD_EXPIRES,
    ),
    Row(
        "http-flood-silent-connections",
        http_flood_silent,
        Expect(code="overloaded", status=429, closed=True),
    ),
    Row(
        "http-flood-keep-alive-connections",
        http_flood_keep_alive,
        Expect(code="overloaded", status=429, closed=True),
    ),
]


def test_row_names_are_unique() -> None:
    names = [row.name for row in ROWS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
async def test_abuse_is_refused_writes_nothing_and_the_node_stays_up(
    row: Row, data_dir: Path
) -> None:
    async with running_node(data_dir, **row.overrides) as node:
        before = written(node)
        seen = await row.probe(node)
        expect = row.expect
        assert seen.code == expect.code, seen
        if expect.status is not None:
            assert seen.status == expect.status, seen
        if expect.code is not None:
            retryable = ERROR_CLASSES[ErrorCode(expect.code)].retryable
            assert seen.retryable is retryable, seen
        if expect.closed:
            assert seen.closed, seen
        await node.close_opened()
        assert written(node) == before
        # The node is up on both surfaces, and the row changed nothing of acme/c.
        client = await TcpProbe.welcomed(node)
        assert await client.call("c", "increment") == Seen(result=2)
        answer = await http_call("/v1/facets/acme/c/increment", None)(node)
        assert answer.status == 200, answer
        assert answer.result == 3


def test_every_row_is_documented() -> None:
    """docs/reliability.md section 6 maps each row to this test."""
    text = (REPO / "docs" / "reliability.md").read_text()
    section = text.partition("## 6.")[2].partition("\n## 7.")[0]
    missing = [row.name for row in ROWS if f"`{row.name}`" not in section]
    assert not missing, missing
