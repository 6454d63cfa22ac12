"""Fuzz target: a peer's bytes into a protocol ``Connection``, whole and cut anywhere.

Run: ``python fuzz/fuzz_frames.py -runs=N -dict=fuzz/frames.dict [corpus dirs]``.

Input: ``CONTROL_BYTES`` control bytes, then the byte stream a peer sends:

- byte 0: ``frame_bytes_max``, one of :data:`FRAME_LIMITS` (small ones so the limit is reached);
- byte 1: flags: 1 start with a valid ``hello`` (to get past the handshake), 2 end with EOF,
  4 client role (decoding a server's frames), 8 answer the ``hello`` with an error, not
  ``welcome``;
- byte 2: where to cut the stream into reads (0 whole, 255 byte by byte, else seeded cuts);
- byte 3: the batch limit passed to ``next_events`` (1 to 16);
- byte 4: which calls the server answers after each batch (bit ``i % 8`` for the i-th call).

The stream is decoded twice. The **adapter path** feeds it read by read like the TCP session
(``next_events`` batches, more bytes only when a batch comes back empty, the handshake one event
at a time, calls answered after their batch). The **reference path** feeds it whole and takes
one event at a time with ``next_event``, answering the same calls at the same points. Oracles:

- the only exception either path may raise is ``RemoteProtocolError``, and after it the
  connection stays failed;
- both paths see the same events (the adapter path may lose the rest of a batch that ended in
  a violation: its events are then a prefix, shorter by less than the batch limit) and end the
  same way (closed, violation, need more data, handshake refused);
- every event has the documented field types, and re-encoding it round-trips byte for byte
  (``encode(decode(encode(e))) == encode(e)``);
- whenever the connection asks for more data it holds less than one frame
  (``buffered_bytes < frame_bytes_max + 4``), and with ``FACETRT_FUZZ_ALLOCATIONS=1`` the
  adapter path allocates at most ``ALLOCATION_BASE + ALLOCATION_PER_BYTE * len(input)`` bytes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: find the fuzz package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._harness import (  # after the path fix above
    Control,
    bounded_allocation,
    chunks,
    fuzz_main,
    instrumented,
    split_points,
)

with instrumented(enabled=__name__ == "__main__"):
    import msgpack

    from facetrt._errors import RemoteProtocolError
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
        State,
        Welcome,
        encode_frame,
    )
    from facetrt.protocol._events import from_body, to_body
    from facetrt.protocol._framing import HEADER_BYTES

CONTROL_BYTES = 5
FRAME_LIMITS = (1, 16, 64, 200, 1024, 4096, 65536, 4 * 1024 * 1024)
HELLO_FRAME = encode_frame({"t": "hello", "v": 1, "key": "frt_0123456789abcdef_" + "A" * 43})
# Decoded msgpack costs at most ~120 bytes of Python objects per input byte (a fixarray of
# 15 nils: 1 byte, a 15-slot list); the harness keeps every event of the input; headroom 2x.
ALLOCATION_BASE = 256 * 1024
ALLOCATION_PER_BYTE = 256
_ID_MAX = 2**63 - 1


@dataclass
class Run:
    """What one path saw: events, where its batches ended, how it ended."""

    events: list[Event] = field(default_factory=list)
    batch_ends: list[int] = field(default_factory=list)
    end: str = ""  # "closed", "violation", "need_data", "refused"


@dataclass(frozen=True)
class Setting:
    role: Role
    frame_bytes_max: int
    eof: bool
    refuse_hello: bool
    limit: int
    answer_mask: int


def check(data: bytes) -> None:
    """The oracle for one input (see the module docstring)."""
    control = Control(data, CONTROL_BYTES)
    flags = control.byte(1)
    setting = Setting(
        role=Role.CLIENT if flags & 4 else Role.SERVER,
        frame_bytes_max=control.pick(0, FRAME_LIMITS),
        eof=bool(flags & 2),
        refuse_hello=bool(flags & 8),
        limit=1 + control.byte(3) % 16,
        answer_mask=control.byte(4),
    )
    stream = (HELLO_FRAME if flags & 1 else b"") + control.payload
    reads = chunks(stream, split_points(len(stream), control.byte(2), 16))
    bound = ALLOCATION_BASE + ALLOCATION_PER_BYTE * len(data)
    adapter = bounded_allocation(lambda: _adapter_path(setting, reads), bound, "adapter path")
    reference = _reference_path(setting, stream, adapter.batch_ends)
    _compare(setting, adapter, reference)
    for event in reference.events:
        _check_fields(event)
        _check_round_trip(event)


def _new_connection(setting: Setting) -> Connection:
    # A client's hello is not sent: receiving does not depend on it, and it may not fit
    # the small limits.
    return Connection(setting.role, frame_bytes_max=setting.frame_bytes_max)


def _adapter_path(setting: Setting, reads: list[bytes]) -> Run:
    """Read by read, batch by batch, as ``server._tcp`` drives a connection."""
    conn = _new_connection(setting)
    run = Run()
    pending = [*reads, b""] if setting.eof else list(reads)
    calls = 0
    try:
        while True:
            # The handshake is read one event at a time: welcome must go out before calls.
            limit = 1 if conn.state is State.HANDSHAKE else setting.limit
            batch = conn.next_events(limit)
            assert len(batch) <= limit, f"{len(batch)} events for a limit of {limit}"
            if not batch:
                buffered = conn.buffered_bytes
                assert buffered < setting.frame_bytes_max + HEADER_BYTES, (
                    f"{buffered} bytes buffered waiting for data, limit {setting.frame_bytes_max}"
                )
                if not pending:
                    run.end = "need_data"
                    return run
                conn.receive_data(pending.pop(0))
                continue
            assert all(isinstance(e, Closed) for e in batch[-1:]) or not any(
                isinstance(e, Closed) for e in batch
            ), "Closed before the end of a batch"
            for event in batch:
                if isinstance(event, Closed):
                    run.end = "closed"
                    return run
                run.events.append(event)
            run.batch_ends.append(len(run.events))
            start = len(run.events) - len(batch)
            calls, refused = _respond(setting, conn, run.events[start:], calls)
            if refused:
                run.end = "refused"
                return run
    except RemoteProtocolError:
        _check_failed_for_good(conn)
        run.end = "violation"
        return run


def _reference_path(setting: Setting, stream: bytes, batch_ends: list[int]) -> Run:
    """Everything at once, one ``next_event`` at a time, answering where the adapter did."""
    conn = _new_connection(setting)
    run = Run()
    if stream:
        conn.receive_data(stream)
    if setting.eof:
        conn.receive_data(b"")
    calls = 0
    answered_up_to = 0
    ends = iter(batch_ends)
    next_end = next(ends, None)
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, NeedData):
                run.end = "need_data"
                return run
            if isinstance(event, Closed):
                run.end = "closed"
                return run
            run.events.append(event)
            if next_end is not None and len(run.events) == next_end:
                batch = run.events[answered_up_to:]
                answered_up_to = len(run.events)
                next_end = next(ends, None)
                calls, refused = _respond(setting, conn, batch, calls)
                if refused:
                    run.end = "refused"
                    return run
    except RemoteProtocolError:
        _check_failed_for_good(conn)
        run.end = "violation"
        return run


def _respond(
    setting: Setting, conn: Connection, batch: list[Event], calls: int
) -> tuple[int, bool]:
    """Answer a batch as a server would; (calls seen so far, whether the hello was refused)."""
    for event in batch:
        if setting.role is Role.CLIENT:
            continue
        if isinstance(event, Hello):
            if setting.refuse_hello:
                conn.send(ErrorReply(id=None, code="unauthorized", message="no", retryable=False))
                return calls, True
            conn.send(Welcome(tenant="t", calls_in_flight_max=64, frame_bytes_max=1024))
        elif isinstance(event, Call):
            if setting.answer_mask >> (calls % 8) & 1:
                conn.send_result(event.id, None)
            calls += 1
        elif isinstance(event, Ping):
            conn.send(Pong(id=event.id))
    return calls, False


def _check_failed_for_good(conn: Connection) -> None:
    assert conn.state is State.ERROR, f"state {conn.state} after a violation"
    for attempt in (lambda: conn.next_events(1), conn.next_event, lambda: conn.receive_data(b"x")):
        try:
            attempt()
        except RemoteProtocolError:
            continue
        raise AssertionError("a failed connection went on")


def _compare(setting: Setting, adapter: Run, reference: Run) -> None:
    adapter_frames = [_encoded(e) for e in adapter.events]
    reference_frames = [_encoded(e) for e in reference.events]
    assert adapter.end == reference.end, f"ends differ: {adapter.end} != {reference.end}"
    if adapter.end == "violation":
        # The adapter loses the events decoded before the violation in the same batch.
        lost = len(reference_frames) - len(adapter_frames)
        assert 0 <= lost < setting.limit, f"{lost} events lost for a batch limit {setting.limit}"
        reference_frames = reference_frames[: len(adapter_frames)]
    assert adapter_frames == reference_frames, "the two paths decoded different events"


def _encoded(event: Event) -> bytes:
    # Compared as bytes: a NaN in the arguments is not equal to itself.
    return encode_frame(to_body(event))


def _check_round_trip(event: Event) -> None:
    frame = _encoded(event)
    body = msgpack.unpackb(frame[HEADER_BYTES:], raw=False, strict_map_key=True)
    again = from_body(body)
    assert type(again) is type(event), f"{type(event).__name__} came back as {again!r:.80}"
    assert _encoded(again) == frame, f"{type(event).__name__} does not round-trip"


def _check_fields(event: Event) -> None:
    """The documented field types (docs/protocol.md section 4), checked independently."""
    if isinstance(event, Hello):
        assert type(event.key) is str and type(event.version) is int
    elif isinstance(event, Welcome):
        assert type(event.tenant) is str and type(event.version) is int
        assert type(event.calls_in_flight_max) is int and type(event.frame_bytes_max) is int
    elif isinstance(event, Call):
        _check_id(event.id)
        assert type(event.agent) is str and type(event.method) is str
        assert type(event.args) is list and type(event.kwargs) is dict
        for optional in (event.cls, event.idempotency_key, event.traceparent):
            assert optional is None or type(optional) is str
        assert event.deadline_ms is None or type(event.deadline_ms) is int
        _check_value([event.args, event.kwargs])
    elif isinstance(event, Result):
        _check_id(event.id)
        _check_value(event.value)
    elif isinstance(event, ErrorReply):
        if event.id is not None:
            _check_id(event.id)
        assert type(event.code) is str and type(event.message) is str
        assert type(event.retryable) is bool
    elif isinstance(event, (Ping, Pong)):
        _check_id(event.id)
    else:
        assert isinstance(event, Bye), f"unknown event {event!r:.80}"


def _check_id(value: object) -> None:
    assert type(value) is int and 0 <= value <= _ID_MAX, f"bad id {value!r:.40}"


def _check_value(value: object) -> None:
    """A decoded msgpack value: no ext, no tuple, keys str or bin (docs/protocol.md section 3)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            assert all(type(key) in (str, bytes) for key in item), "a map key of another type"
            stack.extend(item.values())
        else:
            assert item is None or type(item) in (bool, int, float, str, bytes), type(item)
            if type(item) is int:
                assert -(2**63) <= item < 2**64, f"integer {item} outside msgpack's range"


if __name__ == "__main__":
    fuzz_main(check)
