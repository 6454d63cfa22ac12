"""The sans-IO protocol: a client/server Connection pair, round-trips and hostile bytes."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facetrt._errors import LocalProtocolError, RemoteProtocolError
from facetrt.protocol import (
    NEED_DATA,
    Bye,
    Call,
    Closed,
    Connection,
    ErrorReply,
    Event,
    Hello,
    Ping,
    Pong,
    Result,
    Role,
    State,
    Welcome,
)
from facetrt.protocol._events import call_from_body, checked_call_from_body, to_body

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.integers(min_value=0, max_value=2**63 - 1)
optional_text = st.none() | st.text(max_size=30)

calls = st.builds(
    Call,
    id=ids,
    agent=st.text(max_size=30),
    method=st.text(max_size=30),
    args=st.lists(values, max_size=4),
    kwargs=st.dictionaries(st.text(max_size=8), values, max_size=4),
    cls=optional_text,
    idempotency_key=optional_text,
    traceparent=optional_text,
    deadline_ms=st.none() | st.integers(min_value=0, max_value=2**31),
)
results = st.builds(Result, id=ids, value=values)
errors = st.builds(
    ErrorReply, id=ids, code=st.text(max_size=20), message=st.text(), retryable=st.booleans()
)


def _open_pair() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    _deliver(client.send(Hello(key="k")), server)
    assert server.next_event() == Hello(key="k")
    _deliver(
        server.send(Welcome(tenant="t", calls_in_flight_max=8, frame_bytes_max=1 << 20)), client
    )
    assert isinstance(client.next_event(), Welcome)
    assert client.state is State.OPEN
    assert server.state is State.OPEN
    return client, server


def _deliver(data: bytes, to: Connection) -> None:
    to.receive_data(data)


def test_handshake_call_and_out_of_order_replies() -> None:
    client, server = _open_pair()
    first = Call(id=1, agent="a", method="m", args=[1], kwargs={"x": b"y"}, cls="C")
    second = Call(id=2, agent="b", method="n")
    _deliver(client.send(first) + client.send(second), server)
    assert server.next_event() == first
    assert server.next_event() == second
    assert server.next_event() is NEED_DATA
    assert server.calls_in_flight == 2
    _deliver(server.send(Result(id=2, value=[None])) + server.send(Result(id=1, value=3)), client)
    assert client.next_event() == Result(id=2, value=[None])
    assert client.next_event() == Result(id=1, value=3)
    assert server.calls_in_flight == 0
    _deliver(client.send(Ping(id=7)), server)
    assert server.next_event() == Ping(id=7)
    _deliver(server.send(Pong(id=7)), client)
    assert client.next_event() == Pong(id=7)
    _deliver(client.send(Bye()), server)
    assert server.next_event() == Bye()
    assert server.state is State.CLOSING
    server.receive_data(b"")
    assert server.next_event() == Closed()
    assert server.state is State.CLOSED  # type: ignore[comparison-overlap]  # EOF changed it


@settings(max_examples=200)
@given(st.lists(calls, min_size=1, max_size=5, unique_by=lambda call: call.id))
def test_calls_round_trip(sent: list[Call]) -> None:
    client, server = _open_pair()
    data = b"".join(client.send(call) for call in sent)
    server.receive_data(data)
    assert [server.next_event() for _ in sent] == sent


@settings(max_examples=200)
@given(st.one_of(results, errors))
def test_replies_round_trip(reply: Result | ErrorReply) -> None:
    client, server = _open_pair()
    server.receive_data(client.send(Call(id=reply.id or 0, agent="a", method="m")))
    server.next_event()
    fixed: Event = (
        Result(id=reply.id or 0, value=reply.value)
        if isinstance(reply, Result)
        else ErrorReply(
            id=reply.id or 0, code=reply.code, message=reply.message, retryable=reply.retryable
        )
    )
    client.receive_data(server.send(fixed))
    assert client.next_event() == fixed


def _drain(connection: Connection) -> None:
    while True:
        event = connection.next_event()
        if event is NEED_DATA or isinstance(event, Closed):
            return


@settings(max_examples=500)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_yield_events_or_a_protocol_error(data: bytes, bytewise: bool) -> None:
    server = Connection(Role.SERVER, frame_bytes_max=1024)
    try:
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for chunk in [*chunks, b""]:
            server.receive_data(chunk)
            _drain(server)
    except RemoteProtocolError:
        assert server.state is State.ERROR


@settings(max_examples=300)
@given(st.lists(values, max_size=3))
def test_valid_frames_with_random_bodies_never_crash(bodies: list[object]) -> None:
    server = Connection(Role.SERVER, frame_bytes_max=4096)
    data = b""
    for body in bodies:
        payload = msgpack.packb(body, use_bin_type=True)
        data += struct.pack(">I", len(payload)) + payload
    try:
        server.receive_data(data + b"")
        _drain(server)
    except RemoteProtocolError:
        assert server.state is State.ERROR


def test_oversized_length_is_refused_before_buffering() -> None:
    server = Connection(Role.SERVER, frame_bytes_max=100)
    server.receive_data(struct.pack(">I", 101))
    with pytest.raises(RemoteProtocolError, match="outside"):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.next_event()  # ERROR for good


@pytest.mark.parametrize(
    "body",
    [
        {"t": "call", "id": 1},  # call before hello
        {"t": "hello", "v": True, "key": "k"},  # bool is not an int
        {"t": "nope"},
        [1, 2],
    ],
)
def test_bad_first_frames_are_protocol_errors(body: object) -> None:
    server = Connection(Role.SERVER)
    payload = msgpack.packb(body)
    server.receive_data(struct.pack(">I", len(payload)) + payload)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_extension_types_and_non_string_keys_are_refused() -> None:
    for payload in (
        msgpack.packb(msgpack.ExtType(1, b"x")),
        msgpack.packb({1: 2}),
        b"\xc1",  # never used
    ):
        server = Connection(Role.SERVER)
        server.receive_data(struct.pack(">I", len(payload)) + payload)
        with pytest.raises(RemoteProtocolError):
            server.next_event()


def test_duplicate_in_flight_id_and_call_after_bye_are_refused() -> None:
    client, server = _open_pair()
    server.receive_data(client.send(Call(id=1, agent="a", method="m")))
    server.next_event()
    raw = Connection(Role.CLIENT)
    raw.state = State.OPEN
    server.receive_data(raw.send(Call(id=1, agent="a", method="m")))
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        server.next_event()
    client, server = _open_pair()
    server.receive_data(raw.send(Bye()) + Connection(Role.CLIENT).send(Hello(key="x")))
    assert server.next_event() == Bye()
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_local_violations_are_refused() -> None:
    client, server = _open_pair()
    with pytest.raises(LocalProtocolError):
        client.send(Result(id=1, value=None))
    with pytest.raises(LocalProtocolError, match="not in flight"):
        server.send(Result(id=9, value=None))
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send(Call(id=1, agent="a", method="m"))
    small = Connection(Role.SERVER, frame_bytes_max=10)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        small.send(Welcome(tenant="t" * 20, calls_in_flight_max=1, frame_bytes_max=10))


def test_eof_mid_frame_is_a_protocol_error() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"\x00\x00\x00\x05ab")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server.next_event()


@settings(max_examples=100)
@given(values)
def test_send_result_equals_send_of_a_result_event(value: object) -> None:
    client, server = _open_pair()
    server.receive_data(client.send(Call(id=1, agent="a", method="m")))
    server.receive_data(client.send(Call(id=2, agent="a", method="m")))
    server.next_event()
    server.next_event()
    fast = server.send_result(1, value)
    slow = server.send(Result(id=2, value=value))  # type: ignore[arg-type]  # any msgpack value
    client.receive_data(fast + slow)
    assert client.next_event() == Result(id=1, value=value)  # type: ignore[arg-type]
    assert client.next_event() == Result(id=2, value=value)  # type: ignore[arg-type]
    assert server.calls_in_flight == 0
    with pytest.raises(LocalProtocolError, match="not in flight"):
        server.send_result(1, value)


def _open_server() -> Connection:
    server = Connection(Role.SERVER)
    server.receive_data(Connection(Role.CLIENT).send(Hello(key="k")))
    assert server.next_event() == Hello(key="k")
    server.send(Welcome(tenant="t", calls_in_flight_max=8, frame_bytes_max=1 << 20))
    return server


def _frame(body: object) -> bytes:
    payload = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


# Frames as a client might send them: valid calls, call bodies with random field values (the
# fast path must refuse what the checked path refuses), pings, byes, and raw garbage.
CALL_FIELDS = ("id", "agent", "method", "args", "kwargs", "class", "idem", "trace", "deadline")


@st.composite
def call_fields(draw: st.DrawFn) -> dict[str, object]:
    """A valid call body with a few fields replaced by random values or removed."""
    body = to_body(draw(calls))
    changed = draw(
        st.dictionaries(
            st.sampled_from(CALL_FIELDS),
            st.none() | values | st.integers(min_value=-5, max_value=5),
            max_size=2,
        )
    )
    body.update(changed)
    for name in draw(st.lists(st.sampled_from(CALL_FIELDS), max_size=1)):
        body.pop(name, None)
    return body


frames = st.one_of(
    calls.map(lambda call: _frame(to_body(call))),
    call_fields().map(_frame),
    ids.map(lambda i: _frame({"t": "ping", "id": i})),
    st.just(_frame({"t": "bye"})),
    st.binary(min_size=1, max_size=12),
)


def _events_one_by_one(server: Connection, chunks: list[bytes]) -> tuple[list[object], bool]:
    events: list[object] = []
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            while (event := server.next_event()) is not NEED_DATA:
                events.append(event)
                if isinstance(event, Closed):
                    break
    except RemoteProtocolError:
        return events, True
    return events, False


def _events_batched(
    server: Connection, chunks: list[bytes], limit: int
) -> tuple[list[object], bool]:
    events: list[object] = []
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            while batch := server.next_events(limit):
                assert len(batch) <= limit
                events.extend(batch)
                if isinstance(batch[-1], Closed):
                    break
    except RemoteProtocolError:
        return events, True
    return events, False


@settings(max_examples=400)
@given(st.lists(frames, max_size=8), st.data(), st.integers(min_value=1, max_value=5))
def test_batched_decoding_equals_one_by_one(
    sent: list[bytes], data: st.DataObject, limit: int
) -> None:
    """next_events is next_event in batches: the same events, the same violations."""
    stream = b"".join(sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    chunks = [chunk for chunk in chunks if chunk] + [b""]
    single, single_failed = _events_one_by_one(_open_server(), chunks)
    batched, batched_failed = _events_batched(_open_server(), chunks, limit)
    assert single_failed == batched_failed
    if single_failed:
        # Events decoded in the same batch as the violation are lost with the connection.
        assert single[: len(batched)] == batched
    else:
        assert single == batched


def test_a_call_after_bye_in_the_same_batch_is_refused() -> None:
    server = _open_server()
    call = {"t": "call", "id": 1, "agent": "a", "method": "m", "args": [], "kwargs": {}}
    server.receive_data(_frame(call) + _frame({"t": "bye"}) + _frame({**call, "id": 2}))
    with pytest.raises(RemoteProtocolError, match="call after bye"):
        server.next_events(10)
    assert server.state is State.ERROR


@settings(max_examples=500)
@given(call_fields())
def test_the_fast_call_decoder_agrees_with_the_checked_one(body: dict[str, object]) -> None:
    try:
        expected: object = checked_call_from_body(body)
    except RemoteProtocolError:
        expected = RemoteProtocolError
    try:
        got: object = call_from_body(body)
    except RemoteProtocolError:
        got = RemoteProtocolError
    assert got == expected
