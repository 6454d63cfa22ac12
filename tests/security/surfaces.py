"""A real daemon on loopback (TCP and HTTP) and raw clients for both surfaces.

The abuse tests speak to the daemon the way an attacker would: raw bytes on a socket, so that
nothing (no client library, no URL normalisation) cleans up what they send. ``Seen`` is what
came back: a SPEC §4 code with its retryable flag and HTTP status, and whether the server
closed the connection.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from facetrt.config import load_daemon_config
from facetrt.protocol import (
    Call,
    Closed,
    Connection,
    ErrorReply,
    Event,
    Hello,
    NeedData,
    Result,
    Role,
    Welcome,
)
from facetrt.protocol._framing import encode_frame
from facetrt.server._daemon import Daemon, DaemonInfo
from facetrt.storage import SystemStore
from tests.util import wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

    from facetrt import Value

CLASSES = {"Counter": "facetrt.examples:Counter", "Register": "tests.facets:Register"}
# Small limits, so that the edges are cheap to reach.
VALUE_BYTES_MAX = 1024
FRAME_BYTES_MAX = VALUE_BYTES_MAX + 64 * 1024  # the smallest the config allows
BODY_BYTES_MAX = 4096
CONNECTIONS_MAX = 4
RECEIVE_SECONDS = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Seen:
    """What a probe got back. ``code`` None: no SPEC §4 error (a result, or nothing)."""

    code: str | None = None
    retryable: bool | None = None
    status: int | None = None  # HTTP only
    closed: bool = False  # the server closed the connection
    result: Value = None


@dataclass(slots=True)
class Node:
    """A running daemon with two tenants, their keys and one existing facet (acme/c = 1)."""

    daemon: Daemon
    info: DaemonInfo
    data_dir: Path
    keys: dict[str, str]  # "acme", "globex", "acme-revoked"
    opened: list[trio.SocketStream] = field(default_factory=list)

    @property
    def http_address(self) -> tuple[str, int]:
        assert self.info.http_address is not None
        return self.info.http_address

    @property
    def admin_key(self) -> str:
        return self.info.admin_key_path.read_text().strip()

    async def tcp(self) -> trio.SocketStream:
        stream = await trio.open_tcp_stream(*self.info.tcp_address)
        self.opened.append(stream)
        return stream

    async def http(self) -> trio.SocketStream:
        stream = await trio.open_tcp_stream(*self.http_address)
        self.opened.append(stream)
        return stream

    def connections_open(self, surface: str) -> float:
        value = self.daemon.registry.get_sample_value(
            "facetrt_connections_open", {"surface": surface}
        )
        return value or 0.0

    async def close_opened(self) -> None:
        for stream in self.opened:
            await trio.aclose_forcefully(stream)
        self.opened.clear()
        await wait_until(
            lambda: self.connections_open("tcp") == 0 and self.connections_open("http") == 0
        )


def seed_system(data_dir: Path) -> dict[str, str]:
    """Tenants acme and globex, a key each, and a revoked second key of acme."""
    system = SystemStore(data_dir / "system")
    try:
        keys = {}
        for tenant in ("acme", "globex"):
            system.create_tenant(tenant)
            keys[tenant] = system.create_key(tenant)[1]
        revoked_id, keys["acme-revoked"] = system.create_key("acme")
        system.revoke_key(revoked_id)
    finally:
        system.close()
    return keys


@contextlib.asynccontextmanager
async def running_node(data_dir: Path, **overrides: object) -> AsyncIterator[Node]:
    """A daemon with both surfaces on loopback, small limits, and acme/c = 1."""
    keys = seed_system(data_dir)
    config = load_daemon_config(
        overrides={
            "data_dir": str(data_dir),
            "server.listen": "127.0.0.1:0",
            "server.http": "127.0.0.1:0",
            "server.frame_bytes_max": FRAME_BYTES_MAX,
            "server.http_body_bytes_max": BODY_BYTES_MAX,
            "server.connections_max": CONNECTIONS_MAX,
            "server.http_connections_max": CONNECTIONS_MAX,
            "server.auth_failures_free": 1000,  # these tests fail to authenticate on purpose
            "runtime.value_bytes_max": VALUE_BYTES_MAX,
            "runtime.commit_threads": 2,
            "classes": CLASSES,
            **overrides,
        }
    )
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(daemon.run)
        node = Node(daemon, info, data_dir, keys)
        assert daemon.runtime is not None
        assert await daemon.runtime.call("acme", "c", "increment", cls="Counter") == 1
        try:
            yield node
        finally:
            for stream in node.opened:
                await trio.aclose_forcefully(stream)
            daemon.stop()


# -- what is on disk -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Written:
    """Everything a refused request must leave as it was: the tenants' directories (every
    file and directory, with the size of each store's data file) and the system store's
    tenants and keys."""

    tree: frozenset[tuple[str, int]]
    tenants: tuple[str, ...]
    keys: tuple[tuple[str, str | None, bool], ...]


def written(node: Node) -> Written:
    root = node.data_dir / "tenants"
    tree = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            tree.add((os.path.relpath(os.path.join(directory, name), root), -1))
        for name in files:
            path = os.path.join(directory, name)
            size = os.path.getsize(path) if name == "data.mdb" else -1
            tree.add((os.path.relpath(path, root), size))
    system = node.daemon.system
    assert system is not None
    keys = tuple(
        (record.key_id, record.tenant, record.revoked is not None) for record in system.list_keys()
    )
    return Written(frozenset(tree), tuple(system.list_tenants()), keys)


# -- TCP -------------------------------------------------------------------------------------


def frame_filler(body: Mapping[str, object], field: str) -> str:
    """A str that makes ``body`` with it in ``field`` a frame of exactly ``frame_bytes_max``."""
    filler = "x" * (FRAME_BYTES_MAX - 100)  # the same msgpack str header size as the result
    overhead = len(encode_frame({**body, field: filler})) - 4 - len(filler)
    filler = "x" * (FRAME_BYTES_MAX - overhead)
    assert len(encode_frame({**body, field: filler})) - 4 == FRAME_BYTES_MAX
    return filler


class TcpProbe:
    """A raw protocol client on one connection (the sans-IO client ``Connection``)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)
        self.next_id = 0

    @classmethod
    async def open(cls, node: Node, key: str) -> tuple[TcpProbe, Event | Closed]:
        """Connect and say hello with ``key``; the server's first answer."""
        probe = cls(await node.tcp())
        await probe.stream.send_all(probe.conn.send(Hello(key=key)))
        return probe, await probe.receive()

    @classmethod
    async def welcomed(cls, node: Node, tenant: str = "acme") -> TcpProbe:
        probe, welcome = await cls.open(node, node.keys[tenant])
        assert isinstance(welcome, Welcome), welcome
        return probe

    async def receive(self) -> Event | Closed:
        with trio.fail_after(RECEIVE_SECONDS):
            while True:
                event = self.conn.next_event()
                if not isinstance(event, NeedData):
                    return event
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""  # reset by the server: closed as well
                self.conn.receive_data(data)

    async def call(self, agent: str, method: str, *args: Value, **options: object) -> Seen:
        """One call; what came back (a reply, or the connection's end)."""
        self.next_id += 1
        call = Call(self.next_id, agent, method, list(args), **options)  # type: ignore[arg-type]
        await self.stream.send_all(self.conn.send(call))
        return await self.seen()

    async def send_body(self, body: Mapping[str, object]) -> Seen:
        """A frame built by hand (fields the client's encoder would refuse)."""
        await self.stream.send_all(encode_frame(dict(body)))
        return await self.seen()

    async def seen(self) -> Seen:
        event = await self.receive()
        if isinstance(event, Closed):
            return Seen(closed=True)
        if isinstance(event, Result):
            return Seen(result=event.value)
        assert isinstance(event, ErrorReply), event
        closed = False
        if event.id is None:  # connection-level: the server closes next
            closed = isinstance(await self.receive(), Closed)
        return Seen(code=event.code, retryable=event.retryable, closed=closed)


async def handshake_seen(node: Node, key: str) -> Seen:
    """The server's answer to ``hello`` with ``key`` (then whether it closed)."""
    probe, first = await TcpProbe.open(node, key)
    if isinstance(first, Welcome):
        return Seen(result=first.tenant)
    if isinstance(first, Closed):
        return Seen(closed=True)
    assert isinstance(first, ErrorReply), first
    closed = isinstance(await probe.receive(), Closed)
    return Seen(code=first.code, retryable=first.retryable, closed=closed)


# -- HTTP ------------------------------------------------------------------------------------


def http_request(
    path: str,
    key: str | None,
    body: bytes | None = b"{}",
    *,
    headers: Mapping[str, str] | None = None,
    method: str = "POST",
    raw_authorization: bytes | None = None,
) -> bytes:
    """One HTTP/1.1 request as bytes, exactly as given (``path`` is not normalised)."""
    lines = [f"{method} {path} HTTP/1.1".encode("latin-1"), b"Host: facetrt", b"Connection: close"]
    if raw_authorization is not None:
        lines.append(b"Authorization: " + raw_authorization)
    elif key is not None:
        lines.append(f"Authorization: Bearer {key}".encode())
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}".encode("latin-1"))
    if body is not None:
        lines.append(b"Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def parse_response(data: bytes) -> Seen:
    """The status and SPEC §4 error of a complete response (the server then closed)."""
    if not data:
        return Seen(closed=True)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        return Seen(status=200, closed=True, result=json.loads(body)["result"])
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return Seen(status=status, closed=True)  # an HTTP-level answer of hypercorn's own
    return Seen(code=error["code"], retryable=error["retryable"], status=status, closed=True)


async def read_to_end(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(RECEIVE_SECONDS):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            received += chunk
    return received


async def http_seen(node: Node, request: bytes) -> Seen:
    """Send one whole request (``Connection: close``) and read the answer to the end."""
    stream = await node.http()
    await stream.send_all(request)
    return parse_response(await read_to_end(stream))


async def trickle(stream: trio.SocketStream, data: bytes, seconds_per_byte: float) -> None:
    """Send ``data`` a byte at a time; stop quietly when the server has closed."""
    for index in range(len(data)):
        try:
            await stream.send_all(data[index : index + 1])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.sleep(seconds_per_byte)


async def trickled(
    stream: trio.SocketStream, head: bytes, data: bytes, seconds_per_byte: float
) -> tuple[bytes, float]:
    """Send ``head`` at once, then ``data`` a byte at a time while reading: every byte the
    server sent until it closed, and how long after the head that took."""
    await stream.send_all(head)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, stream, data, seconds_per_byte)
        received = await read_to_end(stream)
        nursery.cancel_scope.cancel()
    return received, trio.current_time() - started
