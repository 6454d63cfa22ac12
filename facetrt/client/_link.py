"""One connection of the client: pipelined calls over a single stream, replies by id.

Per connection there is one reader task and one writer task. A caller encodes its call frame,
registers a waiter under a fresh call id, appends the frame to the outbox and wakes the writer,
which sends everything queued with one ``send``; the reader decodes every frame a read returned
and wakes the waiter of each reply, in whatever order replies come. At most the server's
``calls_in_flight_max`` calls are in flight: a caller waits for a free slot, and a slot is only
freed when the reply (even one nobody waits for any more) arrived, so the client never makes
the server stop reading. A lost connection fails every call in flight with
:class:`UnavailableError`.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import deque
from typing import TYPE_CHECKING, Final, final

import anyio

from .._errors import (
    ERROR_CLASSES,
    BadRequestError,
    ErrorCode,
    FacetrtError,
    HandlerError,
    InternalError,
    LocalProtocolError,
    RemoteProtocolError,
    UnavailableError,
)
from ..protocol import (
    NEED_DATA,
    Bye,
    Closed,
    Connection,
    ErrorReply,
    Hello,
    Ping,
    Pong,
    Result,
    Role,
    Welcome,
    encode_frame,
)

if TYPE_CHECKING:
    import ssl

    from anyio.abc import ByteStream

    from .._values import Value
    from ._url import ServerUrl

logger = logging.getLogger(__name__)

RECEIVE_BYTES_MAX: Final = 64 * 1024  # as the server reads (see server/_tcp.py)
HEADER_BYTES: Final = 4  # the frame's length prefix
# The largest frame the server may be configured to send (ServerConfig.frame_bytes_max's bound):
# the real limit is only known from the welcome, read by this same decoder.
FRAME_RECEIVE_BYTES_MAX: Final = 256 * 1024 * 1024
_STREAM_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
# "ValueError: text" from a handler, "on_activate raised ValueError: text" from a hook.
_HANDLER_TYPE = re.compile(r"(?:\w+ raised )?([A-Za-z_][\w.]*): ")


def error_from_reply(reply: ErrorReply) -> FacetrtError:
    """The exception an error frame stands for (an unknown code becomes ``internal``)."""
    try:
        code = ErrorCode(reply.code)
    except ValueError:
        return InternalError(f"server error with unknown code {reply.code!r}: {reply.message}")
    error_class = ERROR_CLASSES[code]
    if error_class is HandlerError:
        match = _HANDLER_TYPE.match(reply.message)
        return HandlerError(reply.message, type_name=match.group(1) if match else "Exception")
    return error_class(reply.message)


def encode_call(
    call_id: int,
    agent_id: str,
    method: str,
    args: list[Value],
    kwargs: dict[str, Value],
    cls: str | None,
    idempotency_key: str | None,
    deadline_ms: int | None,
) -> bytes:
    """The frame ``Connection.send(Call(...))`` returns (byte for byte, tested), built directly.

    Why: building the frozen ``Call`` and its body costs more than the rest of a pipelined call;
    and a client connection checks nothing about a call it sends but its own state, which the
    link tracks (a failed or closing link sends nothing).

    Raises:
        BadRequestError: an argument is not a msgpack value.
    """
    body: dict[str, object] = {
        "t": "call",
        "id": call_id,
        "agent": agent_id,
        "method": method,
        "args": args,
        "kwargs": kwargs,
    }
    if cls is not None:
        body["class"] = cls
    if idempotency_key is not None:
        body["idem"] = idempotency_key
    if deadline_ms is not None:
        body["deadline"] = deadline_ms
    try:
        return encode_frame(body)
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack refused an argument
        raise BadRequestError(f"arguments are not msgpack values: {exc}") from None


def _copy(error: FacetrtError) -> FacetrtError:
    """A fresh instance for each caller: one exception object must not be raised in two tasks."""
    if isinstance(error, HandlerError):
        return HandlerError(error.message, type_name=error.type_name)
    return type(error)(error.message)


@final
class _Waiter:
    """One call in flight: the caller waits on ``done``; the reader fills in the outcome."""

    __slots__ = ("done", "error", "value")

    def __init__(self, done: anyio.Event) -> None:
        self.done = done
        self.value: Value = None
        self.error: FacetrtError | None = None


@final
class Link:
    """One open, authenticated connection: its reader, its writer and its calls in flight."""

    def __init__(self, stream: ByteStream, conn: Connection, welcome: Welcome) -> None:
        self.stream = stream
        self.conn = conn
        self.tenant = welcome.tenant
        # The running backend's Event class, called directly: anyio.Event() looks the backend
        # up on every call, a measurable share of a pipelined call's cost.
        self.new_event: type[anyio.Event] = type(anyio.Event())
        # Call slots (the server's calls_in_flight_max), handed to waiters in FIFO order.
        self._slots_free = welcome.calls_in_flight_max
        self._slot_waiters: deque[anyio.Event] = deque()
        self.waiters: dict[int, _Waiter] = {}
        self.error: FacetrtError | None = None  # why the link failed; set once
        self.is_usable = True  # False once failed, closing, or the server said bye
        self._ids = itertools.count(1)
        self._outbox: list[bytes] = []
        self._writer_wake = anyio.Event()
        self._scope = anyio.CancelScope()

    async def run(self) -> None:
        """Read and write until the connection fails or the client closes."""
        try:
            with self._scope:
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(self._write_loop)
                    await self._read_loop()
        finally:
            self.fail(UnavailableError("the connection to the server was closed"))
            await anyio.aclose_forcefully(self.stream)

    def fail(self, error: FacetrtError) -> None:
        """Fail every call in flight with (a copy of) ``error`` and stop the link's tasks."""
        if self.error is not None:
            return
        self.error = error
        self.is_usable = False
        waiters = list(self.waiters.values())
        self.waiters.clear()
        for waiter in waiters:
            waiter.error = _copy(error)
            waiter.done.set()
            self._release_slot()
        self._scope.cancel()

    def _release_slot(self) -> None:
        if self._slot_waiters:
            self._slot_waiters.popleft().set()  # handed over: _slots_free stays as it is
        else:
            self._slots_free += 1

    async def _acquire_slot(self) -> None:
        """Take a call slot, waiting (in FIFO order) for one while all are in use.

        Without waiting it does not checkpoint: the call checkpoints when it awaits its reply.
        """
        if self._slots_free:
            self._slots_free -= 1
            return
        event = self.new_event()
        self._slot_waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():  # handed a slot just as we were cancelled: pass it on
                self._release_slot()
            else:
                self._slot_waiters.remove(event)
            raise

    def is_closing(self) -> bool:
        # A method, not the attribute: mypy would keep a narrowed attribute across awaits.
        return not self.is_usable

    async def call(
        self,
        agent_id: str,
        method: str,
        args: list[Value],
        kwargs: dict[str, Value],
        cls: str | None,
        idempotency_key: str | None,
        deadline_ms: int | None,
    ) -> Value:
        """Send one call and wait for its reply.

        Cancellation (or a deadline) leaves the call in flight: its reply, when it comes, is
        dropped and only then frees the slot.
        """
        if not self.is_usable:
            raise UnavailableError("the connection is closing")
        call_id = next(self._ids)
        frame = encode_call(
            call_id, agent_id, method, args, kwargs, cls, idempotency_key, deadline_ms
        )
        if len(frame) - HEADER_BYTES > self.conn.frame_bytes_max:
            raise LocalProtocolError(
                f"frame of {len(frame) - HEADER_BYTES} bytes exceeds the server's limit of "
                f"{self.conn.frame_bytes_max}"
            )
        await self._acquire_slot()
        if self.is_closing():  # it failed or closed while we waited for a slot
            self._release_slot()
            raise UnavailableError("the connection closed before the call was sent")
        waiter = _Waiter(self.new_event())
        self.waiters[call_id] = waiter
        self._outbox.append(frame)
        self._writer_wake.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    # -- reading and writing -----------------------------------------------------------

    async def _read_loop(self) -> None:
        conn = self.conn
        receive = self.stream.receive
        waiters = self.waiters
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(await receive(RECEIVE_BYTES_MAX))
                elif isinstance(event, Result):
                    waiter = waiters.pop(event.id, None)
                    if waiter is not None:
                        self._release_slot()
                        waiter.value = event.value
                        waiter.done.set()
                elif isinstance(event, ErrorReply):
                    if event.id is None:  # connection-level: the server closes after it
                        self.fail(error_from_reply(event))
                        return
                    waiter = waiters.pop(event.id, None)
                    if waiter is not None:
                        self._release_slot()
                        waiter.error = error_from_reply(event)
                        waiter.done.set()
                elif isinstance(event, Ping):
                    self._outbox.append(conn.send(Pong(id=event.id)))
                    self._writer_wake.set()
                elif isinstance(event, Bye):
                    self.is_usable = False  # answers still come; new calls go elsewhere
                elif isinstance(event, Closed):
                    self.fail(UnavailableError("the server closed the connection"))
                    return
        except _STREAM_ERRORS as exc:
            self.fail(UnavailableError(f"the connection to the server was lost: {exc!r}"))
        except RemoteProtocolError as exc:
            logger.warning("closing a connection after a protocol error: %s", exc.message)
            self.fail(RemoteProtocolError(f"the server broke the protocol: {exc.message}"))

    async def _write_loop(self) -> None:
        outbox = self._outbox
        send = self.stream.send
        try:
            while True:
                if not outbox:
                    self._writer_wake = self.new_event()
                    await self._writer_wake.wait()
                    continue
                data = b"".join(outbox) if len(outbox) > 1 else outbox[0]
                outbox.clear()
                await send(data)
        except _STREAM_ERRORS as exc:
            self.fail(UnavailableError(f"the connection to the server was lost: {exc!r}"))


async def open_link(
    url: ServerUrl, key: str, ssl_context: ssl.SSLContext | None, connect_seconds: float
) -> Link:
    """Connect and authenticate.

    Raises:
        UnavailableError: cannot connect, or the connection broke during the handshake.
        UnauthorizedError, ForbiddenError, BadRequestError: the server refused the hello.
    """
    try:
        with anyio.fail_after(connect_seconds):
            stream: ByteStream
            if url.is_tls:
                stream = await anyio.connect_tcp(
                    url.host, url.port, tls=True, ssl_context=ssl_context
                )
            else:
                stream = await anyio.connect_tcp(url.host, url.port)
    except (OSError, anyio.BrokenResourceError) as exc:  # TimeoutError is an OSError
        raise UnavailableError(f"cannot connect to {url}: {exc!r}") from exc
    return await handshake(stream, key, peer=str(url), seconds=connect_seconds)


async def handshake(stream: ByteStream, key: str, *, peer: str, seconds: float) -> Link:
    """Authenticate on a connected ``stream`` (closed on failure); ``peer`` names it in errors.

    Raises:
        UnavailableError: the connection broke during the handshake.
        UnauthorizedError, ForbiddenError, BadRequestError: the server refused the hello.
    """
    try:
        conn = Connection(Role.CLIENT, frame_bytes_max=FRAME_RECEIVE_BYTES_MAX)
        with anyio.fail_after(seconds):
            await stream.send(conn.send(Hello(key=key)))
            while (event := conn.next_event()) is NEED_DATA:
                conn.receive_data(await stream.receive(RECEIVE_BYTES_MAX))
    except _STREAM_ERRORS as exc:
        await anyio.aclose_forcefully(stream)
        raise UnavailableError(f"the handshake with {peer} failed: {exc!r}") from exc
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    if isinstance(event, Welcome):
        conn.frame_bytes_max = event.frame_bytes_max  # what the server accepts from us
        return Link(stream, conn, event)
    await anyio.aclose_forcefully(stream)
    if isinstance(event, ErrorReply):
        raise error_from_reply(event)
    raise UnavailableError(f"{peer} closed the connection during the handshake")
