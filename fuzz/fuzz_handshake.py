"""Fuzz target: the handshake, a valid frame around a fuzzed ``hello`` map, and the key check.

Run: ``python fuzz/fuzz_handshake.py -runs=N -dict=fuzz/frames.dict [corpus dirs]``.

Input: ``CONTROL_BYTES`` control bytes, then a payload that fuzzed fields are cut from:

- byte 0: ``t``, one of :data:`TYPES` (mostly ``"hello"``);
- byte 1: ``v``, one of :data:`VERSIONS` (ints, a bool, a float, a str, missing, ...);
- byte 2: ``key``: a real tenant key, the admin key, a revoked key, a deleted tenant's key, a
  well-formed unknown key, one of those mutated, the payload as text or as bin, other types;
- bytes 3-4: the mutation (flip, cut, extend, swap the secret of one key into another) and
  where it applies;
- byte 5: flags: 1 add an unknown field, 2 add a bin ``b"key"`` field (ignored: not the str
  key), 4 follow the hello with the payload as more frames, 8 deliver the frame a byte at a time.

The keys are checked against a real :class:`facetrt.storage.SystemStore` (LMDB in a temporary
directory) holding a tenant key, the admin key, a revoked key and a deleted tenant's key.
Oracles, from an independent model of ``docs/protocol.md`` section 5 and SPEC §4:

- the frame decodes to ``Hello(key, v)`` exactly when ``t == "hello"``, ``v`` is an int and
  ``key`` a str; otherwise the only outcome is ``RemoteProtocolError``;
- a ``v`` other than 1 is refused ``bad_request``; then the key authenticates exactly when it is
  one of the two live keys, byte for byte (tenant key: that tenant; admin key: refused
  ``forbidden`` on this surface); anything else raises ``UnauthorizedError`` and nothing else;
- the answer (``welcome`` or a connection-level ``error``) encodes within the limit and decodes
  on a client ``Connection`` to the same event, which opens the client only for ``welcome``;
- frames after the handshake give events or ``RemoteProtocolError`` only.
"""

from __future__ import annotations

import atexit
import functools
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: find the fuzz package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._harness import (  # after the path fix above
    Control,
    fuzz_main,
    instrumented,
    scratch_directory,
)

with instrumented(enabled=__name__ == "__main__"):
    import msgpack

    from facetrt._errors import (
        BadRequestError,
        FacetrtError,
        ForbiddenError,
        RemoteProtocolError,
        UnauthorizedError,
    )
    from facetrt.protocol import (
        PROTOCOL_VERSION,
        Closed,
        Connection,
        ErrorReply,
        Hello,
        Role,
        State,
        Welcome,
    )
    from facetrt.storage import SystemStore

CONTROL_BYTES = 6
MISSING = object()
TYPES: tuple[object, ...] = ("hello",) * 4 + ("welcome", "call", "Hello", "", b"hello", 1, None)
VERSIONS: tuple[object, ...] = (1,) * 4 + (
    0,
    2,
    -1,
    2**63,
    2**64 - 1,
    -(2**63),
    True,
    1.0,
    "1",
    None,
    b"\x01",
    MISSING,
)
KEY_KINDS = 12
FRAME_BYTES_MAX = 4096
UNKNOWN_KEY = "frt_0123456789abcdef_" + "A" * 43  # well-formed, in no store


class RawText(bytes):
    """Bytes sent with a msgpack *str* header: text that may not be UTF-8."""


@dataclass(frozen=True)
class Keys:
    store: SystemStore
    tenant: str
    admin: str
    revoked: str
    deleted: str


@functools.cache
def _keys() -> Keys:
    """A real system store with one key of each kind, made once per process."""
    directory = scratch_directory("handshake")
    store = SystemStore(directory / "system")
    atexit.register(store.close)
    store.create_tenant("acme")
    store.create_tenant("gone")
    _, tenant = store.create_key("acme")
    _, admin = store.create_key(None)
    revoked_id, revoked = store.create_key("acme")
    store.revoke_key(revoked_id)
    _, deleted = store.create_key("gone")
    store.delete_tenant("gone")
    return Keys(store=store, tenant=tenant, admin=admin, revoked=revoked, deleted=deleted)


def check(data: bytes) -> None:
    """The oracle for one input (see the module docstring)."""
    control = Control(data, CONTROL_BYTES)
    keys = _keys()
    flags = control.byte(5)
    fields: tuple[tuple[str | bytes, object], ...] = (
        ("t", TYPES[control.byte(0) % len(TYPES)]),
        ("v", VERSIONS[control.byte(1) % len(VERSIONS)]),
        ("key", _key(control, keys)),
    )
    body = {name: value for name, value in fields if value is not MISSING}
    if flags & 1:
        body["extra"] = control.payload[:8]
    if flags & 2:
        body[b"key"] = keys.tenant
    frame = _encode(body)
    reads = [frame[i : i + 1] for i in range(len(frame))] if flags & 8 else [frame]
    trailing = control.payload if flags & 4 else b""

    server = Connection(Role.SERVER, frame_bytes_max=FRAME_BYTES_MAX)
    hello = _receive_hello(server, reads)
    expected = _expected_hello(body) if len(frame) - 4 <= FRAME_BYTES_MAX else None
    if expected is None:
        assert hello is None, f"{hello!r:.120} decoded from a bad hello {body!r:.120}"
        return
    assert hello == expected, f"{hello!r:.120} != {expected!r:.120}"
    answer = _answer(keys, hello)
    _check_answer(server, answer)
    if isinstance(answer, Welcome):
        _check_after_handshake(server, trailing)


def _key(control: Control, keys: Keys) -> object:
    kind = control.byte(2) % KEY_KINDS
    real = (keys.tenant, keys.admin, keys.revoked, keys.deleted, UNKNOWN_KEY)
    if kind < len(real):
        return real[kind]
    payload = control.payload
    if kind == 5:
        return _mutated(real[control.byte(3) % len(real)], control, keys)
    if kind == 6:
        return RawText(payload)  # often not UTF-8
    if kind == 7:
        return payload.decode("latin-1")
    if kind == 8:
        return payload  # bin, not str
    if kind == 9:
        return int.from_bytes(payload[:8], "big")
    if kind == 10:
        return [keys.tenant]
    return MISSING


def _mutated(key: str, control: Control, keys: Keys) -> str:
    how = control.byte(3) // 8 % 8
    at = control.byte(4) % (len(key) + 1)
    text = control.payload.decode("latin-1")
    if how == 0:  # one character changed
        return key[:at] + (text[:1] or "x") + key[at + 1 :]
    if how == 1:  # cut
        return key[:at]
    if how == 2:  # extended
        return key + (text or "\n")
    if how == 3:  # this key's id with the admin key's secret
        return key[:21] + keys.admin[21:]
    if how == 4:  # case changed
        return key.swapcase()
    if how == 5:  # payload inserted
        return key[:at] + text + key[at:]
    if how == 6:  # whitespace around it
        return f" {key}\t"
    return key[:at] + "\u0391" + key[at + 1 :]  # a look-alike letter (Greek capital alpha)


def _encode(body: dict[str | bytes, object]) -> bytes:
    """A frame of ``body``, packed by hand so that a str may hold bytes that are not UTF-8."""
    parts = [bytes([0x80 | len(body)])]  # fixmap: at most 5 entries
    for name, value in body.items():
        parts.append(msgpack.packb(name, use_bin_type=True))
        if isinstance(value, RawText):
            size = len(value)
            if size < 32:
                parts.append(bytes([0xA0 | size]))
            else:
                parts.append(b"\xdb" + struct.pack(">I", size))
            parts.append(bytes(value))
        else:
            parts.append(msgpack.packb(value, use_bin_type=True))
    payload = b"".join(parts)
    return struct.pack(">I", len(payload)) + payload


def _receive_hello(server: Connection, reads: list[bytes]) -> Hello | None:
    """The hello as the session reads it (one event), or None after a protocol violation."""
    try:
        for data in reads:
            server.receive_data(data)
            events = server.next_events(1)
            if events:
                (event,) = events
                assert isinstance(event, Hello), f"{event!r:.80} accepted before the handshake"
                assert server.state is State.HANDSHAKE
                return event
        raise AssertionError("a whole hello frame did not give an event")
    except RemoteProtocolError:
        assert server.state is State.ERROR
        return None


def _expected_hello(body: dict[str | bytes, object]) -> Hello | None:
    """Independent model: which maps are a hello."""
    version = body.get("v")
    key = body.get("key")
    if isinstance(key, RawText):
        try:
            key = bytes(key).decode()
        except UnicodeDecodeError:
            return None
    if body.get("t") != "hello" or type(body.get("t")) is not str:
        return None
    if type(version) is not int or type(key) is not str:
        return None
    return Hello(key=key, version=version)


def _answer(keys: Keys, hello: Hello) -> Welcome | ErrorReply:
    """What the server answers (``server._tcp``), checked against the model of the key check."""
    if hello.version != PROTOCOL_VERSION:
        return _error(BadRequestError(f"unsupported protocol version {hello.version}"))
    live = {keys.tenant: "acme", keys.admin: None}
    try:
        principal = keys.store.authenticate(hello.key)
    except UnauthorizedError as exc:
        assert hello.key not in live, f"a live key was refused: {exc}"
        return _error(exc)
    assert hello.key in live, f"{hello.key!r:.100} authenticated as {principal}"
    assert principal.tenant == live[hello.key], f"{principal} for the wrong key"
    assert keys.store.is_active(principal)
    if principal.tenant is None:
        return _error(ForbiddenError("the admin key cannot call facets"))
    return Welcome(tenant=principal.tenant, calls_in_flight_max=64, frame_bytes_max=FRAME_BYTES_MAX)


def _error(error: FacetrtError) -> ErrorReply:
    return ErrorReply(
        id=None, code=error.code.value, message=error.message, retryable=error.retryable
    )


def _check_answer(server: Connection, answer: Welcome | ErrorReply) -> None:
    frame = server.send(answer)
    client = Connection(Role.CLIENT)
    client.receive_data(frame)
    assert client.next_events(2) == [answer], "the answer does not round-trip"
    assert client.state is (State.OPEN if isinstance(answer, Welcome) else State.HANDSHAKE)
    assert server.state is (State.OPEN if isinstance(answer, Welcome) else State.HANDSHAKE)


def _check_after_handshake(server: Connection, trailing: bytes) -> None:
    if trailing:
        server.receive_data(trailing)
    server.receive_data(b"")
    try:
        while True:
            events = server.next_events(16)
            assert events, "EOF was fed: events, Closed or a violation, never need-data"
            if isinstance(events[-1], Closed):
                return
    except RemoteProtocolError:
        assert server.state is State.ERROR


if __name__ == "__main__":
    fuzz_main(check)
