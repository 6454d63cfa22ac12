"""Connection: the sans-IO protocol state machine for one side of one connection.

States::

    HANDSHAKE --hello/welcome--> OPEN --bye (either way)--> CLOSING --EOF--> CLOSED
        \\______________ any violation (either way) ______________________--> ERROR

Rules:
- The client's first frame is ``hello``; the server answers ``welcome`` (then OPEN) or a
  connection-level ``error`` (id nil) and closes. Nothing else is legal before OPEN.
- When OPEN, clients send ``call``, ``ping``, ``pong`` and ``bye``; servers send ``result``,
  ``error``, ``ping``, ``pong`` and ``bye``. Replies may come in any order.
- A server never has two calls in flight with the same id; it tracks the ids it owes a reply
  (``calls_in_flight``), which the I/O adapter bounds by not reading further (TCP backpressure).
- After ``bye`` from a peer no new calls are accepted from it; pending replies still flow.
- After any :class:`ProtocolError` the state is ERROR for good.

No I/O, no clock, no trio: ``receive_data`` takes bytes (``b""`` is EOF), ``next_event``
returns an event, :data:`NEED_DATA` or a :class:`Closed`, and ``send`` returns bytes to write.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, final

from .._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .._values import packb
from ._events import (
    Bye,
    Call,
    ErrorReply,
    Event,
    Hello,
    Ping,
    Pong,
    Result,
    Welcome,
    call_from_body,
    from_body,
    to_body,
)
from ._framing import FRAME_BYTES_MAX_DEFAULT, HEADER, FrameDecoder, encode_frame

_header = HEADER.pack


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    ERROR = "error"


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the stream (EOF)."""


_CLIENT_SENDS = (Call, Ping, Pong, Bye)
_SERVER_SENDS = (Result, ErrorReply, Ping, Pong, Bye)


@final
class Connection:
    """One side of a facetrt protocol connection."""

    def __init__(self, role: Role, *, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self.frame_bytes_max = frame_bytes_max
        self.peer_said_bye = False
        self._decoder = FrameDecoder(frame_bytes_max)
        self._eof = False
        self._in_flight: set[int] = set()

    @property
    def calls_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def buffered_bytes(self) -> int:
        return self._decoder.buffered_bytes

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the stream; ``b""`` means the peer closed it."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection already failed")
        if data:
            if self._eof:
                raise RemoteProtocolError("data after EOF")
            self._decoder.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData | Closed:
        """The next event from the peer.

        Raises:
            RemoteProtocolError: the peer broke the protocol; close the connection.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection already failed")
        try:
            body = self._decoder.next_body()
            if body is None:
                if self._eof:
                    if self._decoder.buffered_bytes:
                        raise RemoteProtocolError("connection closed in the middle of a frame")
                    self.state = State.CLOSED
                    return Closed()
                return NEED_DATA
            event = from_body(body)
            self._check_received(event)
        except ProtocolError:
            self.state = State.ERROR
            raise
        return event

    def next_events(self, limit: int) -> list[Event | Closed]:
        """Every event the buffered bytes complete, at most ``limit``; empty means need data.

        The batched form of :meth:`next_event` for servers: one call decodes a whole read.
        A :class:`Closed` can only be last.

        Raises:
            RemoteProtocolError: the peer broke the protocol; close the connection. Events
                decoded before the violation are lost with it.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection already failed")
        events: list[Event | Closed] = []
        try:
            bodies = self._decoder.next_bodies(limit)
            if (
                bodies
                and self.role is Role.SERVER
                and self.state is State.OPEN
                and not self.peer_said_bye
            ):
                in_flight = self._in_flight
                for body in bodies:
                    if body.get("t") == "call":
                        # The hot path: what _check_received does for a call, inline.
                        call = call_from_body(body)
                        if self.peer_said_bye:  # a bye earlier in this batch
                            raise RemoteProtocolError("call after bye")
                        if call.id in in_flight:
                            raise RemoteProtocolError(f"call id {call.id} is already in flight")
                        in_flight.add(call.id)
                        events.append(call)
                    else:
                        event = from_body(body)
                        self._check_received(event)
                        events.append(event)
            else:
                for body in bodies:
                    event = from_body(body)
                    self._check_received(event)
                    events.append(event)
            if len(events) < limit and self._eof:
                if self._decoder.buffered_bytes:
                    raise RemoteProtocolError("connection closed in the middle of a frame")
                self.state = State.CLOSED
                events.append(Closed())
        except ProtocolError:
            self.state = State.ERROR
            raise
        return events

    def _check_received(self, event: Event) -> None:
        if self.state is State.HANDSHAKE:
            if self.role is Role.SERVER and isinstance(event, Hello):
                return
            if self.role is Role.CLIENT and isinstance(event, Welcome):
                self.state = State.OPEN
                return
            if self.role is Role.CLIENT and isinstance(event, ErrorReply) and event.id is None:
                return
            raise RemoteProtocolError(f"{type(event).__name__} before the handshake completed")
        allowed = _SERVER_SENDS if self.role is Role.CLIENT else _CLIENT_SENDS
        if not isinstance(event, allowed):
            raise RemoteProtocolError(f"{type(event).__name__} is not allowed from the peer")
        if isinstance(event, Bye):
            self.peer_said_bye = True
            self.state = State.CLOSING
        elif isinstance(event, Call):
            if self.peer_said_bye:
                raise RemoteProtocolError("call after bye")
            if event.id in self._in_flight:
                raise RemoteProtocolError(f"call id {event.id} is already in flight")
            self._in_flight.add(event.id)

    # -- sending ---------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event`` to the peer.

        Raises:
            LocalProtocolError: the protocol does not allow sending ``event`` now.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("connection already failed")
        self._check_sent(event)
        data = encode_frame(to_body(event))
        if len(data) - 4 > self.frame_bytes_max:
            raise LocalProtocolError(
                f"frame of {len(data) - 4} bytes exceeds the limit of {self.frame_bytes_max}"
            )
        return data

    def _check_sent(self, event: Event) -> None:
        if self.state is State.HANDSHAKE:
            if self.role is Role.CLIENT and isinstance(event, Hello):
                return
            if self.role is Role.SERVER and isinstance(event, Welcome):
                self.state = State.OPEN
                return
            if self.role is Role.SERVER and isinstance(event, ErrorReply) and event.id is None:
                return
            raise LocalProtocolError(f"cannot send {type(event).__name__} before the handshake")
        allowed = _CLIENT_SENDS if self.role is Role.CLIENT else _SERVER_SENDS
        if not isinstance(event, allowed):
            raise LocalProtocolError(f"a {self.role.value} cannot send {type(event).__name__}")
        if isinstance(event, Bye):
            self.state = State.CLOSING
        elif isinstance(event, (Result, ErrorReply)) and event.id is not None:
            if event.id not in self._in_flight:
                raise LocalProtocolError(f"reply to call id {event.id}, which is not in flight")
            self._in_flight.discard(event.id)

    def send_result(self, call_id: int, value: object) -> bytes:
        """``send(Result(id=call_id, value=value))`` without building the event: the hot path.

        Raises:
            LocalProtocolError: not a server, not open, ``call_id`` not in flight, or too big.
        """
        if self.role is not Role.SERVER or self.state not in (State.OPEN, State.CLOSING):
            raise LocalProtocolError(f"cannot send a result in state {self.state.value}")
        if call_id not in self._in_flight:
            raise LocalProtocolError(f"reply to call id {call_id}, which is not in flight")
        payload = packb({"t": "result", "id": call_id, "value": value})  # encode_frame, inlined
        data = _header(len(payload)) + payload
        if len(data) - 4 > self.frame_bytes_max:
            raise LocalProtocolError(
                f"frame of {len(data) - 4} bytes exceeds the limit of {self.frame_bytes_max}"
            )
        self._in_flight.discard(call_id)
        return data

    def send_failed(self) -> None:
        """The stream broke while sending: nothing more can be sent or received."""
        self.state = State.ERROR
