"""The msgpack TCP surface end to end: a real daemon, real loopback sockets, a raw client.

The raw client here is the sans-IO ``Connection`` over a trio socket, so these tests pin the
wire behaviour independently of ``facetrt.client``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from facetrt.config import TenantQuotaSettings, load_daemon_config
from facetrt.protocol import (
    Bye,
    Call,
    Closed,
    Connection,
    ErrorReply,
    Event,
    Hello,
    NeedData,
    Ping,
    Pong,
    Result,
    Role,
    Welcome,
)
from facetrt.server._daemon import Daemon, DaemonInfo
from facetrt.storage import SystemStore
from tests.facets import Gate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from facetrt import Value

CLASSES = {
    "Counter": "facetrt.examples:Counter",
    "Gate": "tests.facets:Gate",
    "Register": "tests.facets:Register",
}


class RawClient:
    opened: list[trio.SocketStream] = []  # noqa: RUF012 - closed after each test

    def __init__(self, stream: trio.SocketStream) -> None:
        RawClient.opened.append(stream)
        self.stream = stream
        self.conn = Connection(Role.CLIENT)
        self.next_id = 0

    @classmethod
    async def connect(cls, info: DaemonInfo, key: str) -> tuple[RawClient, Event | Closed]:
        stream = await trio.open_tcp_stream(*info.tcp_address)
        client = cls(stream)
        await stream.send_all(client.conn.send(Hello(key=key)))
        return client, await client.receive()

    async def receive(self) -> Event | Closed:
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.conn.send(event) for event in events))

    def call(self, agent: str, method: str, *args: Value, **options: object) -> Call:
        self.next_id += 1
        return Call(id=self.next_id, agent=agent, method=method, args=list(args), **options)  # type: ignore[arg-type]

    async def call_once(
        self, agent: str, method: str, *args: Value, **options: object
    ) -> Event | Closed:
        await self.send(self.call(agent, method, *args, **options))
        return await self.receive()


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    for stream in RawClient.opened:
        await trio.aclose_forcefully(stream)
    RawClient.opened.clear()


@pytest.fixture
def tenant_keys(data_dir: Path) -> dict[str, str]:
    system = SystemStore(data_dir / "system")
    keys = {}
    for tenant in ("acme", "globex"):
        system.create_tenant(tenant)
        keys[tenant] = system.create_key(tenant)[1]
    system.close()
    return keys


async def _start(
    nursery: trio.Nursery, data_dir: Path, **overrides: object
) -> tuple[Daemon, DaemonInfo]:
    config = load_daemon_config(
        overrides={
            "data_dir": str(data_dir),
            "server.listen": "127.0.0.1:0",
            "server.http": "",
            "classes": CLASSES,
            **overrides,
        }
    )
    daemon = Daemon(config)
    info: DaemonInfo = await nursery.start(daemon.run)
    return daemon, info


@pytest.fixture
async def served(
    data_dir: Path, tenant_keys: dict[str, str]
) -> AsyncIterator[tuple[Daemon, DaemonInfo, dict[str, str]]]:
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir)
        yield daemon, info, tenant_keys
        daemon.stop()


async def test_handshake_and_calls(served: tuple[Daemon, DaemonInfo, dict[str, str]]) -> None:
    _, info, keys = served
    client, welcome = await RawClient.connect(info, keys["acme"])
    assert isinstance(welcome, Welcome)
    assert welcome.tenant == "acme"
    reply = await client.call_once("c", "increment", 2, cls="Counter")
    assert reply == Result(id=1, value=2)
    await client.send(Ping(id=9))
    assert await client.receive() == Pong(id=9)
    reply = await client.call_once("c", "nope")
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.retryable) == ("not_found", False)
    await client.send(Bye())
    assert isinstance(await client.receive(), Closed)


async def test_pipelined_calls_get_their_own_replies(
    served: tuple[Daemon, DaemonInfo, dict[str, str]],
) -> None:
    _, info, keys = served
    client, _ = await RawClient.connect(info, keys["acme"])
    calls = [client.call(f"c{index % 7}", "increment", cls="Counter") for index in range(300)]
    await client.send(*calls)
    replies: dict[int, Value] = {}
    while len(replies) < len(calls):
        event = await client.receive()
        assert isinstance(event, Result)
        replies[event.id] = event.value
    for agent in range(7):
        values = sorted(replies[c.id] for c in calls if c.agent == f"c{agent}")  # type: ignore[type-var]
        assert values == list(range(1, len(values) + 1))


async def test_tenant_is_taken_from_the_key(
    served: tuple[Daemon, DaemonInfo, dict[str, str]],
) -> None:
    _, info, keys = served
    acme, _ = await RawClient.connect(info, keys["acme"])
    globex, _ = await RawClient.connect(info, keys["globex"])
    assert await acme.call_once("shared", "increment", cls="Counter") == Result(id=1, value=1)
    assert await globex.call_once("shared", "increment", cls="Counter") == Result(id=1, value=1)
    assert await acme.call_once("shared", "get") == Result(id=2, value=1)


@pytest.mark.parametrize("key", ["", "nope", "frt_0000000000000000_" + "a" * 43])
async def test_bad_keys_are_refused_at_the_handshake(
    served: tuple[Daemon, DaemonInfo, dict[str, str]], key: str
) -> None:
    _, info, _ = served
    client, reply = await RawClient.connect(info, key)
    assert isinstance(reply, ErrorReply)
    assert (reply.id, reply.code) == (None, "unauthorized")
    assert isinstance(await client.receive(), Closed)


async def test_admin_key_cannot_call_facets(
    served: tuple[Daemon, DaemonInfo, dict[str, str]],
) -> None:
    _, info, _ = served
    admin_key = info.admin_key_path.read_text().strip()
    _, reply = await RawClient.connect(info, admin_key)
    assert isinstance(reply, ErrorReply)
    assert reply.code == "forbidden"


async def test_revoked_key_fails_on_the_next_call(
    served: tuple[Daemon, DaemonInfo, dict[str, str]],
) -> None:
    daemon, info, keys = served
    client, _ = await RawClient.connect(info, keys["acme"])
    assert isinstance(await client.call_once("c", "increment", cls="Counter"), Result)
    assert daemon.system is not None
    key_id = keys["acme"].split("_")[1]
    daemon.system.revoke_key(key_id)
    reply = await client.call_once("c", "increment", cls="Counter")
    assert isinstance(reply, ErrorReply)
    assert reply.code == "unauthorized"
    assert daemon.runtime is not None
    assert await daemon.runtime.call("acme", "c", "get") == 1  # nothing written


async def test_protocol_error_closes_only_that_connection(
    served: tuple[Daemon, DaemonInfo, dict[str, str]],
) -> None:
    _, info, keys = served
    good, _ = await RawClient.connect(info, keys["acme"])
    bad, _ = await RawClient.connect(info, keys["acme"])
    await bad.stream.send_all(struct.pack(">I", 2**31) + b"garbage")
    reply = await bad.receive()
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad_request"
    assert isinstance(await good.call_once("c", "increment", cls="Counter"), Result)


async def test_calls_in_flight_are_bounded_per_connection(
    data_dir: Path, tenant_keys: dict[str, str]
) -> None:
    Gate.events["g"] = trio.Event()
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir, **{"server.calls_in_flight_max": 4})
        client, _ = await RawClient.connect(info, tenant_keys["acme"])
        assert isinstance(await client.call_once("g", "put", "k", 0, cls="Gate"), Result)
        calls = [client.call("g", "wait_and_put", "k", index) for index in range(10)]
        await client.send(*calls)
        assert daemon.runtime is not None
        for _ in range(100):
            await trio.sleep(0.01)
        # One running, three queued; the other six are still in the socket.
        assert daemon.runtime.statistics().queued_envelopes == 3
        Gate.events["g"].set()
        got = {
            event.id
            for event in [await client.receive() for _ in calls]
            if isinstance(event, Result)
        }
        assert got == {call.id for call in calls}
        daemon.stop()


async def test_deadline_answers_timeout(data_dir: Path, tenant_keys: dict[str, str]) -> None:
    Gate.events["d"] = trio.Event()
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir)
        client, _ = await RawClient.connect(info, tenant_keys["acme"])
        # The facet exists first: on a loaded machine the deadline may pass before the gated
        # call starts (then it is skipped and would not have created the facet).
        assert isinstance(await client.call_once("d", "put", "k", 0, cls="Gate"), Result)
        reply = await client.call_once("d", "wait_and_put", "k", 1, deadline_ms=50)
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.retryable) == ("timeout", True)
        Gate.events["d"].set()
        assert isinstance(await client.call_once("d", "get", "k"), Result)
        daemon.stop()


async def test_slow_sender_is_disconnected(data_dir: Path, tenant_keys: dict[str, str]) -> None:
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir, **{"server.frame_seconds": 0.2})
        client, _ = await RawClient.connect(info, tenant_keys["acme"])
        await client.stream.send_all(b"\x00\x00\x00\x10abc")  # 16 bytes announced, 3 sent
        with trio.fail_after(5):
            assert await client.stream.receive_some(100) == b""
        daemon.stop()


async def test_stop_drains_calls_in_flight(data_dir: Path, tenant_keys: dict[str, str]) -> None:
    Gate.events["s"] = trio.Event()
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir)
        client, _ = await RawClient.connect(info, tenant_keys["acme"])
        assert isinstance(await client.call_once("s", "put", "k", 0, cls="Gate"), Result)
        await client.send(client.call("s", "wait_and_put", "k", 1))
        await trio.sleep(0.05)
        daemon.stop()
        await trio.sleep(0.05)
        assert not daemon.health.ready
        Gate.events["s"].set()
        reply = await client.receive()
        assert isinstance(reply, Result), reply
        assert isinstance(await client.receive(), Bye)
        assert isinstance(await client.receive(), Closed)
    # The acknowledged write is on disk.
    system_free = load_daemon_config(overrides={"data_dir": str(data_dir), "classes": CLASSES})
    async with trio.open_nursery() as nursery:
        daemon = Daemon(
            system_free.model_copy(
                update={
                    "server": system_free.server.model_copy(
                        update={"listen": "127.0.0.1:0", "http": ""}
                    )
                }
            )
        )
        await nursery.start(daemon.run)
        assert daemon.runtime is not None
        assert await daemon.runtime.call("acme", "s", "get", "k") == 1
        daemon.stop()


async def test_dribbled_frame_is_cut_off_by_one_deadline(
    data_dir: Path, tenant_keys: dict[str, str]
) -> None:
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir, **{"server.frame_seconds": 0.3})
        client, _ = await RawClient.connect(info, tenant_keys["acme"])
        frame = client.conn.send(client.call("c", "increment", cls="Counter"))
        with trio.fail_after(5):
            for byte in frame:
                try:
                    await client.stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.1)  # each byte well within 0.3 s, the frame not
            assert await client.stream.receive_some(100) == b""
        daemon.stop()


async def test_malformed_traceparent_is_bad_request(
    served: tuple[Daemon, DaemonInfo, dict[str, str]],
) -> None:
    _, info, keys = served
    client, _ = await RawClient.connect(info, keys["acme"])
    reply = await client.call_once("c", "increment", cls="Counter", traceparent="garbage")
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad_request"
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    reply = await client.call_once("c", "increment", cls="Counter", traceparent=good)
    assert reply == Result(id=2, value=1)


async def test_client_that_never_reads_stops_being_read(
    data_dir: Path, tenant_keys: dict[str, str]
) -> None:
    """Replies waiting to be written count against the connection: no unbounded buffering."""
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir, **{"server.calls_in_flight_max": 8})
        await _never_reads(daemon, info, tenant_keys["acme"])
        daemon.stop()


async def _never_reads(daemon: Daemon, info: DaemonInfo, key: str) -> None:
    client, _ = await RawClient.connect(info, key)
    assert isinstance(
        await client.call_once("big", "put", "v", "x" * 300_000, cls="Register"), Result
    )
    assert daemon.runtime is not None
    before = daemon.runtime.statistics().calls
    calls = [client.call("big", "get", "v") for _ in range(200)]
    with trio.move_on_after(2):
        await client.send(*calls)  # may block: the server stopped reading, buffers are full
    await trio.sleep(0.3)
    handled = daemon.runtime.statistics().calls - before
    assert handled < 100, handled


async def test_error_codes_reach_the_wire(data_dir: Path, tenant_keys: dict[str, str]) -> None:
    """Every SPEC §4 code the runtime can produce arrives over TCP with its retryable flag."""
    overrides: dict[str, object] = {
        "runtime.mailbox_envelopes_max": 1,
        "runtime.map_size_bytes_initial": 65536,
        "runtime.map_size_bytes_max": 65536,
    }
    Gate.events["busy"] = trio.Event()
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir, **overrides)
        client, _ = await RawClient.connect(info, tenant_keys["acme"])
        codes: dict[str, tuple[str, bool]] = {}

        async def expect(
            name: str, agent: str, method: str, *args: Value, **options: object
        ) -> None:
            reply = await client.call_once(agent, method, *args, **options)
            assert isinstance(reply, ErrorReply), (name, reply)
            codes[name] = (reply.code, reply.retryable)

        await client.call_once("c", "increment", cls="Counter")
        await expect("conflict", "c", "put", "k", 1, cls="Register")
        await expect("handler_error", "r", "put_then_fail", "k", 1, cls="Register")
        await expect("reentrancy", "r", "call", "r", "get", ["k"], None)
        await expect("bad_request", "r", "put", "k" * 600, 1)  # key over 511 bytes
        await expect("quota_exceeded", "r", "put", "big", "x" * 60_000)
        # A full mailbox: one message running, one queued, the third is shed.
        await client.call_once("busy", "put", "k", 0, cls="Gate")
        await client.send(
            client.call("busy", "wait_and_put", "k", 1), client.call("busy", "put", "k", 2)
        )
        await trio.sleep(0.1)
        await expect("overloaded", "busy", "put", "k", 3)
        Gate.events["busy"].set()
        for _ in range(2):
            assert isinstance(await client.receive(), Result)
        # A store that cannot be created: internal, and the node keeps serving.
        from facetrt import FacetAddress

        fanout = data_dir / FacetAddress("acme", "broken").relative_path().parent
        fanout.parent.mkdir(parents=True, exist_ok=True)
        fanout.write_text("not a directory")
        await expect("internal", "broken", "increment", cls="Counter")
        assert isinstance(await client.call_once("c", "get"), Result)
        daemon.stop()
    assert codes == {
        "conflict": ("conflict", False),
        "handler_error": ("handler_error", False),
        "reentrancy": ("reentrancy", False),
        "bad_request": ("bad_request", False),
        "quota_exceeded": ("quota_exceeded", False),
        "overloaded": ("overloaded", True),
        "internal": ("internal", True),
    }


async def test_a_late_reply_never_writes_to_a_reused_descriptor(
    data_dir: Path, tenant_keys: dict[str, str], tmp_path: Path
) -> None:
    """Replies are written straight to the socket's descriptor from the reply callback; once
    the connection is gone that number may belong to another file, which must stay untouched."""
    Gate.events["late"] = trio.Event()
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir, **{"server.frame_seconds": 0.2})
        client, _ = await RawClient.connect(info, tenant_keys["acme"])
        await client.send(client.call("late", "wait_and_put", "k", 1, cls="Gate"))
        # Half a frame: the server gives up on this connection with the call still running.
        await client.stream.send_all(b"\x00\x00\x00\x10abc")
        with trio.fail_after(5):
            assert await client.stream.receive_some(100) == b""
        await trio.testing.wait_all_tasks_blocked()
        # Lowest free descriptors are reused first: take several so the old one is among them.
        files = [(tmp_path / f"f{index}").open("wb") for index in range(8)]
        try:
            Gate.events["late"].set()  # the call completes and its reply callback runs
            await trio.testing.wait_all_tasks_blocked()
        finally:
            for handle in files:
                handle.close()
        assert [(tmp_path / f"f{index}").stat().st_size for index in range(8)] == [0] * 8
        again, _ = await RawClient.connect(info, tenant_keys["acme"])
        assert await again.call_once("late", "get", "k") == Result(id=1, value=1)
        daemon.stop()


async def test_a_reset_connection_ends_only_its_session(
    served: tuple[Daemon, DaemonInfo, dict[str, str]],
) -> None:
    """The session reads the socket's descriptor directly: a reset (RST) from the peer is a
    lost connection, not a crash, and the call it sent still completes."""
    import socket as stdlib_socket

    _, info, keys = served
    Gate.events["rst"] = trio.Event()
    client, _ = await RawClient.connect(info, keys["acme"])
    await client.send(client.call("rst", "wait_and_put", "k", 7, cls="Gate"))
    await trio.testing.wait_all_tasks_blocked()
    linger_zero = struct.pack("ii", 1, 0)
    client.stream.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, linger_zero)
    await client.stream.aclose()  # close with SO_LINGER 0: the peer gets an RST
    await trio.testing.wait_all_tasks_blocked()
    Gate.events["rst"].set()
    again, _ = await RawClient.connect(info, keys["acme"])
    with trio.fail_after(5):
        assert await again.call_once("rst", "get", "k") == Result(id=1, value=7)


async def test_a_tenants_calls_in_flight_are_bounded_across_its_connections(
    data_dir: Path, tenant_keys: dict[str, str]
) -> None:
    Gate.events["g"] = trio.Event()
    async with trio.open_nursery() as nursery:
        daemon, info = await _start(nursery, data_dir, **{"runtime.tenant_calls_in_flight_max": 4})
        runtime = daemon.runtime
        assert runtime is not None
        first, _ = await RawClient.connect(info, tenant_keys["acme"])
        second, _ = await RawClient.connect(info, tenant_keys["acme"])
        other, _ = await RawClient.connect(info, tenant_keys["globex"])
        assert isinstance(await first.call_once("g", "put", "k", 0, cls="Gate"), Result)
        calls = {
            client: [client.call("g", "wait_and_put", "k", index) for index in range(5)]
            for client in (first, second)
        }
        for client, sent in calls.items():
            await client.send(*sent)

        async def settle() -> None:
            for _ in range(50):
                await trio.sleep(0.01)

        await settle()
        # Four of acme's ten calls were read (one running, three queued); the rest wait in
        # the sockets, refused nothing. Another tenant is not held up by acme's bound.
        assert runtime.statistics().queued_envelopes == 3
        assert isinstance(await other.call_once("c", "increment", cls="Counter"), Result)
        runtime.core.quotas.set_overrides(
            "acme", TenantQuotaSettings.parse({"calls_in_flight_max": 6})
        )
        await settle()
        assert runtime.statistics().queued_envelopes == 5  # raised live: two more were read
        Gate.events["g"].set()
        for client, sent in calls.items():
            events = [await client.receive() for _ in sent]
            assert {event.id for event in events if isinstance(event, Result)} == {
                call.id for call in sent
            }
        assert runtime.core.quotas.in_flight("acme").count == 0
        daemon.stop()
