"""Fuzz target: an HTTP call's body and content type, through to the call's arguments.

Run: ``python fuzz/fuzz_http_body.py -runs=N -dict=fuzz/http_body.dict [corpus dirs]``.

Input: ``CONTROL_BYTES`` control bytes, then the request body:

- byte 0: the ``Content-Type`` header, one of :data:`CONTENT_TYPES` (``None``: no header);
- byte 1: how the length is declared: ``Content-Length`` (right), chunked
  (``Transfer-Encoding``), nothing, or a ``Content-Length`` that is not a number;
- byte 2: where the body is cut into ASGI ``http.request`` messages (0 whole, 255 bytewise);
- byte 3: flags: 1 the client disconnects instead of finishing the body, 2 small limits
  (``http_body_bytes_max`` 1024 and ``value_bytes_max`` 64) instead of the defaults.

The body goes through what ``HttpGateway._call`` does with it: ``Exchange.read_json`` (content
type, size limit, chunks, JSON with ``$bytes`` markers), ``parse_call_body`` and the runtime's
argument check and copy (``RuntimeCore._arguments`` of a real embedded runtime, run on a trio
loop in a helper thread). Oracles:

- outcomes are the arguments, ``BadRequestError`` (400), a 413 or 415 refusal, or
  ``Disconnected``; nothing else;
- an independent model decides which: 415 exactly for the content types that are not JSON
  in UTF-8, 413 exactly for bodies over the limit, and for the rest the body is accepted
  exactly when it is UTF-8 JSON (RFC 8259; a leading BOM is ignored) with finite numbers, no
  lone surrogates, valid ``$bytes`` base64, nesting within 64, a call object of ``args``,
  ``kwargs``, ``class``, and arguments of 64-bit ints within ``value_bytes_max`` encoded;
  the arguments then equal the model's;
- the arguments' fast path (scalars passed without a copy) agrees with the checked copy;
- a value round-trips through the response encoding: ``parse_json(dump_json(to_json(v)))``;
- with ``FACETRT_FUZZ_ALLOCATIONS=1``, decoding allocates at most
  ``ALLOCATION_BASE + ALLOCATION_PER_BYTE * len(body)`` bytes.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import functools
import json
import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if __name__ == "__main__" and not __package__:  # run as a script: find the fuzz package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._harness import (  # after the path fix above
    Control,
    bounded_allocation,
    chunks,
    fuzz_main,
    instrumented,
    scratch_directory,
    split_points,
)

with instrumented(enabled=__name__ == "__main__"):
    import msgpack
    import trio

    from facetrt import RuntimeConfig, open_runtime
    from facetrt._errors import BadRequestError
    from facetrt._json import dump_json, parse_json, to_json
    from facetrt._values import DEPTH_MAX
    from facetrt.config import ServerConfig
    from facetrt.server._http_exchange import Disconnected, Exchange, Refusal, parse_call_body

if TYPE_CHECKING:
    from collections.abc import Mapping

    from facetrt import Runtime
    from facetrt._values import Value

CONTROL_BYTES = 4
CONTENT_TYPES: tuple[bytes | None, ...] = (
    b"application/json",
    b"application/json; charset=utf-8",
    b'application/json;charset="UTF-8"',
    b"APPLICATION/JSON",
    b"application/problem+json",
    b"application/vnd.facetrt+json; charset=utf-8",
    None,
    b"text/plain",
    b"application/json; charset=utf-16",
    b"application/json; charset=latin-1",
    b"application/x-www-form-urlencoded",
    b"application/jsonx",
    b"multipart/form-data; boundary=x",
    b"",
)
JSON_TYPES = frozenset(CONTENT_TYPES[:6])  # the model: which headers mean JSON in UTF-8
SMALL_BODY_BYTES_MAX = 1024
SMALL_VALUE_BYTES_MAX = 64
# JSON decodes to at most ~40 bytes of Python objects per body byte ("[{},{},...]": a 64-byte
# dict per 3 bytes); the argument copy and the chunks double it; headroom 2x. The base allows
# for what the runtimes' own tasks allocate meanwhile on the helper thread.
ALLOCATION_BASE = 1024 * 1024
ALLOCATION_PER_BYTE = 256
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


@dataclass(frozen=True)
class Outcome:
    arguments: tuple[list[Value], dict[str, Value], str | None] | None = None
    refusal: int | None = None  # 400, 413, 415, or 0 for Disconnected


def check(data: bytes) -> None:
    """The oracle for one input (see the module docstring)."""
    control = Control(data, CONTROL_BYTES)
    body = control.payload
    small = bool(control.byte(3) & 2)
    content_type = CONTENT_TYPES[control.byte(0) % len(CONTENT_TYPES)]
    length_mode = control.byte(1) % 4
    disconnect = bool(control.byte(3) & 1)
    headers = [] if content_type is None else [(b"content-type", content_type)]
    if length_mode == 0:
        headers.append((b"content-length", str(len(body)).encode()))
    elif length_mode == 1:
        headers.append((b"transfer-encoding", b"chunked"))
    elif length_mode == 3:
        headers.append((b"content-length", b"12x"))
    messages: list[dict[str, object]] = [
        {"type": "http.request", "body": piece, "more_body": True}
        for piece in chunks(body, split_points(len(body), control.byte(2), 8))
    ]
    if disconnect:
        messages.append({"type": "http.disconnect"})
    else:
        messages.append({"type": "http.request", "body": b"", "more_body": False})
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/facets/acme/a/m",
        "headers": headers,
        "client": ("127.0.0.1", 1),
    }
    loop = _loop()
    run = functools.partial(trio.from_thread.run, _decode, loop, scope, messages, small)
    bound = ALLOCATION_BASE + ALLOCATION_PER_BYTE * len(data)
    outcome = bounded_allocation(
        lambda: run(trio_token=loop.token), bound, "reading and checking the body"
    )
    expected = _model(content_type, length_mode, body, disconnect, small)
    assert outcome.refusal == expected.refusal, (
        f"refusal {outcome.refusal} where the model says {expected.refusal}"
    )
    if outcome.arguments is not None:
        assert expected.arguments is not None
        assert _same(outcome.arguments, expected.arguments), "arguments differ from the model"
        args, kwargs, _ = outcome.arguments
        _check_round_trip([args, kwargs])


async def _decode(
    loop: _Loop, scope: Mapping[str, object], messages: list[dict[str, object]], small: bool
) -> Outcome:
    """``HttpGateway._call``'s body handling, on the helper thread's trio loop."""
    queue = list(messages)

    async def receive() -> Mapping[str, object]:
        return queue.pop(0)

    async def send(message: Mapping[str, object]) -> None:
        raise AssertionError("nothing is sent while reading the body")

    config = loop.servers[small]
    exchange = Exchange(scope, receive, send, config)
    try:
        args, kwargs, cls = parse_call_body(await exchange.read_json())
        runtime = loop.runtimes[small]
        checked = runtime.core._arguments(args, kwargs)
        _check_fast_path(args, kwargs, checked, runtime)
    except Refusal as refusal:
        assert refusal.error.code.value == "bad_request"
        assert refusal.status in (413, 415), refusal.status
        return Outcome(refusal=refusal.status)
    except BadRequestError:
        return Outcome(refusal=400)
    except Disconnected:
        return Outcome(refusal=0)
    return Outcome(arguments=(checked[0], checked[1], cls))


def _check_fast_path(
    args: list[Value],
    kwargs: dict[str, Value],
    checked: tuple[list[Value], dict[str, Value]],
    runtime: Runtime,
) -> None:
    """Scalars are passed without a copy; the copy must agree and keep the size limit."""
    limit = runtime.core.config.value_bytes_max
    encoded = msgpack.packb([args, kwargs], use_bin_type=True)
    assert len(encoded) <= limit, f"arguments of {len(encoded)} bytes accepted, limit {limit}"
    assert msgpack.packb(list(checked), use_bin_type=True) == encoded, "the copy changed them"


def _check_round_trip(value: Value) -> None:
    again = parse_json(dump_json(to_json(value)))
    assert _encoded(again) == _encoded(value), "a value does not round-trip through JSON"


def _encoded(value: object) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _same(
    actual: tuple[list[Value], dict[str, Value], str | None],
    expected: tuple[list[Value], dict[str, Value], str | None],
) -> bool:
    return _encoded(list(actual)) == _encoded(list(expected))


# -- the model -----------------------------------------------------------------------------


class _Refused(Exception):
    pass


def _model(
    content_type: bytes | None, length_mode: int, body: bytes, disconnect: bool, small: bool
) -> Outcome:
    """What the gateway should do, from the documented rules alone."""
    declared = length_mode in (0, 1) and (length_mode == 1 or len(body) > 0)
    body_max = SMALL_BODY_BYTES_MAX if small else ServerConfig().http_body_bytes_max
    is_json = content_type in JSON_TYPES
    if declared and not is_json:
        return Outcome(refusal=415)
    if length_mode == 0 and len(body) > body_max:
        return Outcome(refusal=413)
    if len(body) > body_max:
        return Outcome(refusal=413)
    if disconnect:
        return Outcome(refusal=0)
    if not body:
        return Outcome(arguments=([], {}, None))
    if not is_json:
        return Outcome(refusal=415)
    value_max = SMALL_VALUE_BYTES_MAX if small else RuntimeConfig().value_bytes_max
    try:
        return Outcome(arguments=_model_call(body, value_max))
    except _Refused:
        return Outcome(refusal=400)


def _model_call(body: bytes, value_max: int) -> tuple[list[Value], dict[str, Value], str | None]:
    try:
        # RFC 8259 section 8.1: UTF-8; a parser MAY ignore a byte order mark.
        text = body.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
        document = json.loads(text, parse_constant=_refuse, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise _Refused from exc
    value = _model_value(document, 0)
    if value is None:
        return [], {}, None
    if type(value) is not dict or not set(value) <= {"args", "kwargs", "class"}:
        raise _Refused
    args = value.get("args")
    kwargs = value.get("kwargs")
    cls = value.get("class")
    if args is not None and type(args) is not list:
        raise _Refused
    if kwargs is not None and type(kwargs) is not dict:
        raise _Refused
    if cls is not None and type(cls) is not str:
        raise _Refused
    arguments = [args or [], kwargs or {}]
    if not _ints_fit(arguments) or len(_encoded(arguments)) > value_max:
        raise _Refused
    return args or [], kwargs or {}, cls


def _refuse(text: str) -> float:
    raise ValueError(text)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(text)
    return value


def _model_value(item: object, depth: int) -> Value:
    if type(item) is str:
        if any(0xD800 <= ord(char) <= 0xDFFF for char in item):
            raise _Refused
        return item
    if item is None or type(item) in (bool, int, float):
        return item  # type: ignore[return-value]  # checked just above
    if depth >= DEPTH_MAX:
        raise _Refused
    if type(item) is list:
        return [_model_value(element, depth + 1) for element in item]
    assert type(item) is dict
    if list(item) == ["$bytes"] and type(item["$bytes"]) is str:
        try:
            return base64.b64decode(item["$bytes"], validate=True)
        except (binascii.Error, ValueError):
            raise _Refused from None
    return {_model_key(key): _model_value(element, depth + 1) for key, element in item.items()}


def _model_key(key: str) -> str:
    if any(0xD800 <= ord(char) <= 0xDFFF for char in key):
        raise _Refused
    return key


def _ints_fit(value: object) -> bool:
    if type(value) is int:
        return _INT_MIN <= value <= _INT_MAX
    if type(value) is list:
        return all(_ints_fit(item) for item in value)
    if type(value) is dict:
        return all(_ints_fit(item) for item in value.values())
    return True


# -- the helper thread's trio loop ---------------------------------------------------------


@dataclass
class _Loop:
    token: trio.lowlevel.TrioToken
    runtimes: dict[bool, Runtime]
    servers: dict[bool, ServerConfig]


@functools.cache
def _loop() -> _Loop:
    """A trio loop on a daemon thread hosting two real runtimes (default and small limits)."""
    started = threading.Event()
    stop = threading.Event()
    box: list[_Loop] = []
    directory = scratch_directory("http_body")

    async def main() -> None:
        small = RuntimeConfig(value_bytes_max=SMALL_VALUE_BYTES_MAX)
        async with (
            open_runtime(directory / "default", classes={}) as default_runtime,
            open_runtime(directory / "small", classes={}, config=small) as small_runtime,
        ):
            box.append(
                _Loop(
                    token=trio.lowlevel.current_trio_token(),
                    runtimes={False: default_runtime, True: small_runtime},
                    servers={
                        False: ServerConfig(),
                        True: ServerConfig(http_body_bytes_max=SMALL_BODY_BYTES_MAX),
                    },
                )
            )
            started.set()
            await trio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    started.wait()

    def close() -> None:
        stop.set()
        thread.join(10)

    atexit.register(close)
    loop = box[0]
    for small in (False, True):  # pay first-use costs (trio's thread handoff, caches) now
        empty = [{"type": "http.request", "body": b"", "more_body": False}]
        trio.from_thread.run(
            _decode,
            loop,
            {"headers": [], "method": "POST", "path": "/"},
            empty,
            small,
            trio_token=loop.token,
        )
    return loop


if __name__ == "__main__":
    fuzz_main(check)
