"""One HTTP exchange of the gateway (request in, response out) and its JSON value codec.

**Values.** JSON has no bytes, so ``{"$bytes": "<standard base64>"}`` (an object with exactly
that one key and a string value) means bytes, in arguments and in results. A dict that really is
``{"$bytes": <str>}`` is therefore always read as bytes; facets should not use that shape.
Non-finite floats are refused both ways (JSON cannot carry them); strings must be valid UTF-8
(no lone surrogates from ``\\ud800`` escapes).

**Errors** are ``{"error": {"code", "message", "retryable"}}`` (``handler_error`` adds
``"type"``) with the SPEC §4 status (:data:`STATUS`), except three HTTP-level refusals that
carry the code ``bad_request``: 405 (wrong method), 413 (body over ``http_body_bytes_max``) and
415 (a body that is not ``application/json``).

**Bodies** are read in the chunks hypercorn delivers and refused with 413 as soon as they pass
the limit (or at once from ``Content-Length``), within ``frame_seconds``; nothing past the limit
is kept. A response sent before the request body was read would make hypercorn close the
connection with unread data (the client may see a reset instead of our answer) and can wedge
it (its bounded app queue full, the final ``http.disconnect`` put waiting forever). So before
answering, the rest of the body is read and dropped while at most twice
``http_body_bytes_max`` came in (and for at most ``DISCARD_SECONDS``); past that the answer goes
out with ``Connection: close`` while a helper keeps draining the queue.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol, TypeAlias, cast, final
from urllib.parse import parse_qs, unquote

import trio

from .._errors import (
    BadRequestError,
    ErrorCode,
    FacetrtError,
    HandlerError,
    OverloadedError,
    UnauthorizedError,
    UnavailableError,
)
from .._json import BYTES_MARKER as BYTES_MARKER
from .._json import dump_json as dump_json
from .._json import from_json as from_json
from .._json import parse_json as parse_json
from .._json import to_json as to_json

if TYPE_CHECKING:
    from .._values import Value
    from ..config import ServerConfig

Message: TypeAlias = Mapping[str, object]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]


class ASGIApp(Protocol):
    """An ASGI 3 application."""

    async def __call__(self, scope: Message, receive: Receive, send: Send, /) -> None: ...


STATUS: Final[Mapping[ErrorCode, int]] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.HANDLER_ERROR: 422,
    ErrorCode.REENTRANCY: 409,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.POLICY_VIOLATION: 403,
    ErrorCode.INTERNAL: 500,
}
JSON_TYPE: Final = b"application/json"
DISCARD_SECONDS: Final = 2.0
CALL_FIELDS: Final = frozenset({"args", "kwargs", "class"})


class Refusal(Exception):
    """A refusal with an HTTP status other than its code's (405, 413, 415)."""

    def __init__(self, status: int, error: FacetrtError, *, allow: str | None = None) -> None:
        super().__init__(status, error.message)
        self.status = status
        self.error = error
        self.allow = allow


class Disconnected(Exception):
    """The client went away before its request was read; nobody to answer."""


# -- one request ---------------------------------------------------------------------------


@final
class Exchange:
    """One request and its response: header access, bounded body reading, answering."""

    def __init__(self, scope: Message, receive: Receive, send: Send, config: ServerConfig) -> None:
        self._receive = receive
        self._send = send
        self._body_bytes_max = config.http_body_bytes_max
        self._body_seconds = config.frame_seconds
        self._body_done = False
        self._received = 0
        self.started = False
        self.method = cast("str", scope["method"])
        path = cast("bytes | None", scope.get("raw_path"))
        self.raw_path = path if path is not None else cast("str", scope["path"]).encode()
        self.path = self.raw_path.decode("latin-1")
        self.route = "/".join(self.path.split("/")[:3])  # for logs: no ids
        self.query_string = cast("bytes", scope.get("query_string", b""))
        self.headers: dict[bytes, bytes] = {}
        self._repeated: set[bytes] = set()
        for name, value in cast("list[tuple[bytes, bytes]]", scope["headers"]):
            lowered = name.lower()
            if lowered in self.headers:
                self._repeated.add(lowered)
            self.headers.setdefault(lowered, value)
        client = cast("tuple[str, int] | None", scope.get("client"))
        self.peer = client[0] if client else "?"
        declared = self.headers.get(b"content-length", b"").strip()
        self.content_length = int(declared) if declared.isdigit() else None

    def path_segments(self) -> list[str]:
        """The path's segments, each percent-decoded (UTF-8)."""
        try:
            return [unquote(part, errors="strict") for part in self.path.split("/")[1:]]
        except UnicodeDecodeError:
            raise BadRequestError("the path is not UTF-8 once percent-decoded") from None

    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.query_string.decode("latin-1"), keep_blank_values=True)

    def check_method(self, *allowed: str) -> None:
        if self.method not in allowed:
            message = f"{self.method} is not allowed here; use {' or '.join(allowed)}"
            raise Refusal(405, BadRequestError(message), allow=", ".join(allowed))

    def single_header(self, name: bytes) -> str | None:
        """A header that may appear at most once, as text (UTF-8)."""
        value = self.headers.get(name)
        if value is None:
            return None
        if name in self._repeated:
            raise BadRequestError(f"the {name.decode()} header appears more than once")
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise BadRequestError(f"the {name.decode()} header is not UTF-8") from None

    # -- the body --------------------------------------------------------------------------

    async def read_json(self) -> object:
        """The body parsed as JSON, or None when it is empty."""
        declared = self.content_length
        has_body = bool(declared) or b"transfer-encoding" in self.headers
        if has_body and not _is_json(self.headers.get(b"content-type")):
            raise Refusal(415, BadRequestError("send the body as application/json"))
        if declared is not None and declared > self._body_bytes_max:
            raise self._too_large()
        body = await self._read_body()
        if not body:
            return None
        if not has_body and not _is_json(self.headers.get(b"content-type")):
            raise Refusal(415, BadRequestError("send the body as application/json"))
        return parse_json(body)

    def _too_large(self, limit: int | None = None) -> Refusal:
        limit = limit or self._body_bytes_max
        return Refusal(413, BadRequestError(f"the request body is over {limit} bytes"))

    async def body_chunks(
        self, bytes_max: int, media_types: tuple[bytes, ...]
    ) -> AsyncIterator[bytes]:
        """The body as it arrives (a data import), at most ``bytes_max`` in all; each chunk
        must come within ``frame_seconds`` (the whole body may take longer).

        Raises:
            Refusal: 415 (another media type), 413 (over ``bytes_max``).
            BadRequestError: a chunk did not arrive in time.
        """
        media_type = (self.headers.get(b"content-type") or b"").partition(b";")[0].strip()
        if media_type.lower() not in media_types:
            accepted = " or ".join(kind.decode() for kind in media_types)
            raise Refusal(415, BadRequestError(f"send the body as {accepted}"))
        if self.content_length is not None and self.content_length > bytes_max:
            raise self._too_large(bytes_max)
        size = 0
        while not self._body_done:
            with trio.move_on_after(self._body_seconds) as scope:
                chunk = await self._next_chunk()
            if scope.cancelled_caught:
                raise BadRequestError(f"no body data for {self._body_seconds:g} s")
            size += len(chunk)
            if size > bytes_max:
                raise self._too_large(bytes_max)
            if chunk:
                yield chunk

    def accepts(self, media_type: bytes) -> bool:
        """Whether the Accept header names ``media_type``."""
        return media_type in (self.headers.get(b"accept") or b"").lower()

    async def _read_body(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self._body_seconds) as scope:
            while not self._body_done:
                chunk = await self._next_chunk()
                size += len(chunk)
                if size > self._body_bytes_max:
                    raise self._too_large()
                chunks.append(chunk)
        if scope.cancelled_caught:
            seconds = self._body_seconds
            raise BadRequestError(f"the request body did not arrive within {seconds:g} s")
        return b"".join(chunks)

    async def _next_chunk(self) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        self._body_done = not message.get("more_body", False)
        chunk = cast("bytes", message.get("body", b""))
        self._received += len(chunk)
        return chunk

    async def _discard_body(self, intake_max: float) -> None:
        """Read and drop the rest of the body while at most ``intake_max`` bytes came in."""
        while not self._body_done and self._received <= intake_max:
            await self._next_chunk()

    async def _discard_until_closed(self) -> None:
        with contextlib.suppress(Disconnected):
            await self._discard_body(math.inf)

    # -- answering -------------------------------------------------------------------------

    async def respond_json(self, status: int, payload: object) -> None:
        await self.respond(status, dump_json(to_json(payload)), JSON_TYPE)

    async def respond_error(
        self, error: FacetrtError, status: int | None = None, *, allow: str | None = None
    ) -> None:
        detail: dict[str, object] = {
            "code": error.code.value,
            "message": error.message,
            "retryable": error.retryable,
        }
        if isinstance(error, HandlerError):
            detail["type"] = error.type_name
        headers: list[tuple[bytes, bytes]] = []
        if isinstance(error, UnauthorizedError):
            headers.append((b"www-authenticate", b"Bearer"))
        if isinstance(error, (OverloadedError, UnavailableError)):
            headers.append((b"retry-after", b"1"))
        if allow is not None:
            headers.append((b"allow", allow.encode()))
        status = status if status is not None else STATUS[error.code]
        await self.respond(status, dump_json({"error": detail}), JSON_TYPE, headers)

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        all_headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *(headers or []),
        ]
        declared = self.content_length
        intake_max = 2 * self._body_bytes_max  # what we read plus what we may drop
        if not self._body_done and (declared is None or declared <= intake_max):
            with trio.move_on_after(DISCARD_SECONDS):
                await self._discard_body(intake_max)
        self.started = True
        if self._body_done:
            await self._send_response(status, body, all_headers)
            return
        # Still unread: answer and close, draining hypercorn's queue meanwhile (its final
        # "disconnect" message must find room).
        all_headers.append((b"connection", b"close"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._discard_until_closed)
            await self._send_response(status, body, all_headers)
            nursery.cancel_scope.cancel()

    async def respond_stream(
        self, status: int, content_type: bytes, chunks: AsyncIterator[bytes]
    ) -> None:
        """Answer with a body sent as ``chunks`` come (chunked transfer); the request body
        must have been read (these routes take none, or read it all first)."""
        if not self._body_done:
            with trio.move_on_after(DISCARD_SECONDS):
                await self._discard_body(2 * self._body_bytes_max)
        headers = [(b"content-type", content_type), (b"cache-control", b"no-store")]
        if not self._body_done:
            headers.append((b"connection", b"close"))
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        async for chunk in chunks:
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_response(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


# -- JSON ----------------------------------------------------------------------------------


def parse_call_body(document: object) -> tuple[list[Value], dict[str, Value], str | None]:
    """(args, kwargs, class) from a call's JSON body (None: an empty body)."""
    if document is None:
        return [], {}, None
    if not isinstance(document, dict):
        raise BadRequestError('the body must be a JSON object {"args", "kwargs", "class"}')
    unknown = sorted(set(document) - CALL_FIELDS)
    if unknown:
        raise BadRequestError(f"unknown fields in the body: {unknown}; use args, kwargs, class")
    args = document.get("args")
    kwargs = document.get("kwargs")
    cls = document.get("class")
    if args is not None and not isinstance(args, list):
        raise BadRequestError("args must be a JSON array")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadRequestError("kwargs must be a JSON object")
    if cls is not None and not isinstance(cls, str):
        raise BadRequestError("class must be a string")
    return args or [], kwargs or {}, cls


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media_type, _, parameters = content_type.decode("latin-1").partition(";")
    media_type = media_type.strip().lower()
    charset = parameters.strip().lower()
    if charset and charset.replace(" ", "") not in ("charset=utf-8", 'charset="utf-8"'):
        return False
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )
