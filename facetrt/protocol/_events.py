"""Protocol events: frozen dataclasses and their msgpack map encoding (normative: protocol.md).

Every frame body is a map with a type key ``"t"``. Field names are short because they are
repeated in every frame. Unknown keys are ignored (newer peers may add optional fields);
missing or mistyped required fields are a :class:`RemoteProtocolError`.

========  ===========  ==============================================================
``t``     direction    fields
========  ===========  ==============================================================
hello     c -> s       ``v`` version (int), ``key`` credential (str)
welcome   s -> c       ``v``, ``tenant`` (str), ``inflight`` (int), ``frame`` (int)
call      c -> s       ``id`` (int), ``agent``, ``method`` (str), ``args`` (array),
                       ``kwargs`` (map), ``class``, ``idem``, ``trace`` (str or nil),
                       ``deadline`` (int milliseconds from receipt, or nil)
result    s -> c       ``id``, ``value`` (any msgpack value)
error     s -> c       ``id`` (int, or nil for a connection-level error), ``code``,
                       ``message`` (str), ``retryable`` (bool)
ping      either       ``id``
pong      either       ``id``
bye       either       (no fields): no more calls will be sent; finish and close
========  ===========  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from .._errors import RemoteProtocolError

if TYPE_CHECKING:
    from .._values import Value

PROTOCOL_VERSION = 1
T = TypeVar("T")
_ID_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    key: str
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    tenant: str
    calls_in_flight_max: int
    frame_bytes_max: int
    version: int = PROTOCOL_VERSION


@dataclass(slots=True)
class Call:
    """A call; treat it as immutable like the other events.

    Not ``frozen`` and not keyword-only, unlike the other events, because the server builds one
    per call on its hot path: a frozen keyword-only dataclass of nine fields costs 1.4 µs to
    construct, this one 0.3 µs.
    """

    id: int
    agent: str
    method: str
    args: list[Value] = field(default_factory=list)
    kwargs: dict[str, Value] = field(default_factory=dict)
    cls: str | None = None
    idempotency_key: str | None = None
    traceparent: str | None = None
    deadline_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    id: int
    value: Value


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    id: int | None
    code: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye:
    pass


Event: TypeAlias = Hello | Welcome | Call | Result | ErrorReply | Ping | Pong | Bye


def to_body(event: Event) -> dict[str, object]:
    """The frame body of ``event``."""
    if isinstance(event, Call):
        body: dict[str, object] = {
            "t": "call",
            "id": event.id,
            "agent": event.agent,
            "method": event.method,
            "args": event.args,
            "kwargs": event.kwargs,
        }
        optional = {
            "class": event.cls,
            "idem": event.idempotency_key,
            "trace": event.traceparent,
            "deadline": event.deadline_ms,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        return body
    if isinstance(event, Result):
        return {"t": "result", "id": event.id, "value": event.value}
    if isinstance(event, ErrorReply):
        return {
            "t": "error",
            "id": event.id,
            "code": event.code,
            "message": event.message,
            "retryable": event.retryable,
        }
    if isinstance(event, Hello):
        return {"t": "hello", "v": event.version, "key": event.key}
    if isinstance(event, Welcome):
        return {
            "t": "welcome",
            "v": event.version,
            "tenant": event.tenant,
            "inflight": event.calls_in_flight_max,
            "frame": event.frame_bytes_max,
        }
    if isinstance(event, Ping):
        return {"t": "ping", "id": event.id}
    if isinstance(event, Pong):
        return {"t": "pong", "id": event.id}
    assert isinstance(event, Bye)
    return {"t": "bye"}


def from_body(body: dict[str, object]) -> Event:
    """Decode a frame body.

    Raises:
        RemoteProtocolError: unknown type, or a missing or mistyped field.
    """
    kind = body.get("t")
    if kind == "call":
        return call_from_body(body)
    return _other_from_body(kind, body)


def call_from_body(body: dict[str, object]) -> Call:
    """Decode the body of a ``call`` frame (its ``t`` already checked): the hot path.

    Raises:
        RemoteProtocolError: a missing or mistyped field.
    """
    call_id = body.get("id")
    agent = body.get("agent")
    method = body.get("method")
    args = body.get("args")  # missing: the checked path supplies the default
    kwargs = body.get("kwargs")
    cls = body.get("class")
    idem = body.get("idem")
    trace = body.get("trace")
    deadline = body.get("deadline")
    # One test for the common shape; anything else takes the checked path for its message.
    if (
        type(call_id) is int
        and 0 <= call_id <= _ID_MAX
        and type(agent) is str
        and type(method) is str
        and type(args) is list
        and type(kwargs) is dict
        and (cls is None or type(cls) is str)
        and (idem is None or type(idem) is str)
        and (trace is None or type(trace) is str)
        and (deadline is None or type(deadline) is int)
    ):
        return Call(call_id, agent, method, args, kwargs, cls, idem, trace, deadline)
    return checked_call_from_body(body)


def checked_call_from_body(body: dict[str, object]) -> Call:
    """:func:`call_from_body` field by field, with a message naming the bad field."""
    return Call(
        id=_id(body),
        agent=_field(body, "agent", str),
        method=_field(body, "method", str),
        args=_field(body, "args", list, default=[]),
        kwargs=_field(body, "kwargs", dict, default={}),
        cls=_optional(body, "class", str),
        idempotency_key=_optional(body, "idem", str),
        traceparent=_optional(body, "trace", str),
        deadline_ms=_optional(body, "deadline", int),
    )


def _other_from_body(kind: object, body: dict[str, object]) -> Event:
    if kind == "result":
        if "value" not in body:
            raise RemoteProtocolError("result frame without 'value'")
        return Result(id=_id(body), value=body["value"])  # type: ignore[arg-type]  # msgpack
    if kind == "error":
        error_id = body.get("id")
        return ErrorReply(
            id=None if error_id is None else _id(body),
            code=_field(body, "code", str),
            message=_field(body, "message", str),
            retryable=_field(body, "retryable", bool),
        )
    if kind == "hello":
        return Hello(version=_field(body, "v", int), key=_field(body, "key", str))
    if kind == "welcome":
        return Welcome(
            version=_field(body, "v", int),
            tenant=_field(body, "tenant", str),
            calls_in_flight_max=_field(body, "inflight", int),
            frame_bytes_max=_field(body, "frame", int),
        )
    if kind == "ping":
        return Ping(id=_id(body))
    if kind == "pong":
        return Pong(id=_id(body))
    if kind == "bye":
        return Bye()
    raise RemoteProtocolError(f"unknown frame type {kind!r}")


def _field(body: dict[str, object], key: str, kind: type[T], default: T | None = None) -> T:
    value = body.get(key, default)
    # bool is an int subclass: an int field must not accept True, nor a bool field 1.
    if type(value) is not kind:
        raise RemoteProtocolError(f"frame field {key!r} must be {kind.__name__}, got {value!r:.60}")
    return value


def _optional(body: dict[str, object], key: str, kind: type[T]) -> T | None:
    if body.get(key) is None:
        return None
    return _field(body, key, kind)


def _id(body: dict[str, object]) -> int:
    value = _field(body, "id", int)
    if not 0 <= value <= _ID_MAX:
        raise RemoteProtocolError(f"frame id {value} outside 0..2**63-1")
    return value
