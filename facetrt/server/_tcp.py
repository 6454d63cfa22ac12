"""The msgpack-over-TCP surface: one session per connection, batched end to end.

Per connection there is one reader (this session's task) and one writer task, the only caller
of ``send_all``. The reader decodes every frame a read returned and submits each call to the
runtime without a task per call: the reply comes back as a callback on the loop thread, is
encoded at once and appended to the outbox; the writer sends everything queued with one
``send_all``. A connection stops reading at ``calls_in_flight_max`` calls in flight (TCP
backpressure), and a frame must be finished ``frame_seconds`` after its first byte arrived
(slow senders). A protocol violation closes that connection only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from functools import partial
from typing import TYPE_CHECKING, Final, final

import outcome
import trio

from .._errors import (
    BadRequestError,
    DeadlineExceededError,
    FacetrtError,
    ForbiddenError,
    InternalError,
    LocalProtocolError,
    OverloadedError,
    RemoteProtocolError,
    UnauthorizedError,
    UnavailableError,
)
from ..protocol import (
    PROTOCOL_VERSION,
    Bye,
    Call,
    Closed,
    Connection,
    ErrorReply,
    Hello,
    Ping,
    Pong,
    Role,
    State,
    Welcome,
)
from ..runtime import InFlight

if TYPE_CHECKING:
    from .._ids import FacetAddress
    from .._values import Value
    from ..config import ServerConfig
    from ..metrics import FacetrtMetrics
    from ..protocol import Event
    from ..runtime import Runtime
    from ..runtime._reply import ReplySlot
    from ..storage import Principal, SystemStore
    from ._auth import AuthThrottle

logger = logging.getLogger(__name__)

# One read's buffer. Not larger: recv(n) allocates n bytes before it knows how many arrived,
# and above glibc's mmap threshold that is an mmap and munmap per read (recv(256 KiB) of 600
# bytes costs 14.5 us here, recv(64 KiB) 2.4 us).
RECEIVE_BYTES_MAX = 64 * 1024
CLOSE_SECONDS = 5.0
SESSION_ADDRESSES_MAX = 1024  # per connection; the runtime's cache backs it
# At most 4 KiB of UTF-8: an error reply always fits in a frame (frame_bytes_max >= 64 KiB).
ERROR_MESSAGE_CHARS_MAX = 1024
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _peer_host(stream: trio.abc.Stream) -> str:
    """The peer's address, for auth throttling (through TLS too)."""
    transport = getattr(stream, "transport_stream", stream)
    socket = getattr(transport, "socket", None)
    try:
        return str(socket.getpeername()[0]) if socket is not None else "?"
    except OSError:  # pragma: no cover - the socket died before we looked
        return "?"


# A call id not in _pending (answered at once, or a late result after its deadline).
_ABSENT: Final = trio.CancelScope()
# Before the handshake names the tenant: a bound no session reaches.
_UNBOUNDED: Final = InFlight(None)


def error_reply(call_id: int | None, error: FacetrtError) -> ErrorReply:
    message = error.message
    if len(message) > ERROR_MESSAGE_CHARS_MAX:
        # Messages echo what the caller sent (an id, a method name): one as long as a whole
        # frame made a reply that did not fit, and the call went unanswered.
        message = message[:ERROR_MESSAGE_CHARS_MAX] + "... (cut)"
    return ErrorReply(id=call_id, code=error.code.value, message=message, retryable=error.retryable)


@final
class TcpServer:
    """Serves the wire protocol for one runtime; start with ``nursery.start(server.serve, ...)``."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        system: SystemStore,
        config: ServerConfig,
        metrics: FacetrtMetrics,
        throttle: AuthThrottle,
    ) -> None:
        self.runtime = runtime
        self.system = system
        self.config = config
        self.metrics = metrics
        self.throttle = throttle
        self.draining = False
        self._sessions: set[_Session] = set()
        self._idle = trio.Event()
        self._idle.set()
        self.dirty: list[_Session] = []  # sessions with replies queued since the last flush
        runtime.core.after_release.append(self._flush_dirty)

    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        for session in dirty:
            session.flush()

    async def serve(
        self,
        listeners: list[trio.abc.Listener[trio.abc.Stream]],
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections into the ``connections`` nursery until cancelled.

        Cancelling this task stops accepting; the connections live on in their own nursery
        so that they can drain (their owner bounds that with the shutdown grace).
        """
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, connections)
            task_status.started()

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], connections: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                    logger.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                connections.start_soon(self._handle, stream)

    async def drain(self) -> None:
        """Stop reading new calls on every connection; return when their replies are sent."""
        self.draining = True
        for session in list(self._sessions):
            session.stop_reading()
        await self._idle.wait()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        surface = "tcp"
        if len(self._sessions) >= self.config.connections_max or self.draining:
            # Full is `overloaded` (SPEC §4: the node is full), draining `unavailable`.
            refused: FacetrtError = (
                UnavailableError("server is draining; retry later")
                if self.draining
                else OverloadedError(
                    f"server has {self.config.connections_max} connections open, its limit; "
                    "retry later"
                )
            )
            self.metrics.connections_refused.labels(surface).inc()
            refusal = error_reply(None, refused)
            with trio.move_on_after(CLOSE_SECONDS), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(Connection(Role.SERVER).send(refusal))
            await trio.aclose_forcefully(stream)
            return
        self.metrics.connections_accepted.labels(surface).inc()
        self.metrics.connections.labels(surface).inc()
        session = _Session(self, stream)
        self._sessions.add(session)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            await session.run()
        except* RemoteProtocolError as group:
            self.metrics.protocol_errors.inc()
            error = group.exceptions[0]
            assert isinstance(error, RemoteProtocolError)
            logger.info("closing a connection after a protocol error: %s", error.message)
            await session.send_final(error_reply(None, error))
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; its in-flight calls still commit
        except* trio.TooSlowError:
            logger.info("closing a connection that sent too slowly")
        finally:
            session.detach()
            self._sessions.discard(session)
            if not self._sessions:
                self._idle.set()
            self.metrics.connections.labels(surface).dec()
            await trio.aclose_forcefully(stream)


@final
class _Session:
    def __init__(self, server: TcpServer, stream: trio.abc.Stream) -> None:
        self._server = server
        self._stream = stream
        self._config = server.config
        self._conn = Connection(Role.SERVER, frame_bytes_max=server.config.frame_bytes_max)
        self._core = server.runtime.core
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._outbox_frames = 0  # frames in the outbox (a partly sent chunk may hold many)
        self._unwritten = 0  # frames queued or being sent, not yet handed to the kernel
        self._sending = False  # the writer task is inside send_all
        self._flush_scheduled = False
        # Plain TCP can be written from a reply callback directly (see flush); TLS cannot.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._frame_deadline: float | None = None
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()
        # Who is parked, as plain attributes: ParkingLot.__bool__ is a Python call, and the
        # reply path would make three per call.
        self._writer_parked = False
        self._room_waiters = 0
        self._clock = trio.lowlevel.current_clock().current_time  # one frame, not two
        self._pending: dict[int, trio.CancelScope | None] = {}
        self._addresses: dict[str, FacetAddress] = {}  # agent id -> address, this tenant's
        self._reading = True
        self._read_scope = trio.CancelScope()
        self._principal: Principal | None = None
        self._tenant = ""
        self._flight = _UNBOUNDED  # the tenant's calls in flight, node-wide (after the hello)
        self._peer = _peer_host(stream)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        with trio.fail_after(self._config.handshake_seconds):
            hello = await self._next_event()
        if not isinstance(hello, Hello):
            return  # EOF before the handshake
        if not await self._authenticate(hello):
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            try:
                with self._read_scope:
                    await self._read_loop(nursery)
                # EOF, bye or drain: answer what is in flight, then say bye and close.
                while self._pending:
                    await self._wait_for_room()
                if self._conn.state is State.OPEN:
                    self._queue(Bye())
            finally:
                self._reading = False
                self._writer_lot.unpark_all()

    def stop_reading(self) -> None:
        self._read_scope.cancel()

    async def send_final(self, reply: ErrorReply) -> None:
        """Best effort: tell the peer why we close (protocol violations)."""
        # The session's connection is in ERROR; a fresh one may still send a
        # connection-level error frame.
        frame = Connection(Role.SERVER).send(reply)
        with trio.move_on_after(CLOSE_SECONDS):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.send_all(frame)

    async def _authenticate(self, hello: Hello) -> bool:
        server = self._server
        error: FacetrtError | None = None
        if hello.version != PROTOCOL_VERSION:
            error = BadRequestError(
                f"unsupported protocol version {hello.version}; this server speaks "
                f"{PROTOCOL_VERSION}"
            )
        else:
            try:
                principal = server.system.authenticate(hello.key)
            except UnauthorizedError as exc:
                server.metrics.auth_failures.labels("tcp").inc()
                await server.throttle.failed(self._peer)
                error = exc
            else:
                if principal.tenant is None:
                    error = ForbiddenError("the admin key cannot call facets; use a tenant key")
                else:
                    server.throttle.succeeded(self._peer)
                    self._principal = principal
                    self._tenant = principal.tenant
                    self._flight = self._core.quotas.in_flight(principal.tenant)
        if error is not None:
            await self._stream.send_all(self._conn.send(error_reply(None, error)))
            return False
        welcome = Welcome(
            tenant=self._tenant,
            calls_in_flight_max=self._config.calls_in_flight_max,
            frame_bytes_max=self._config.frame_bytes_max,
        )
        await self._stream.send_all(self._conn.send(welcome))
        return True

    # -- reading -----------------------------------------------------------------------

    async def _next_event(self) -> Event | Closed:
        """The next event, one at a time (the handshake)."""
        while True:
            events = self._conn.next_events(1)
            if events:
                self._frame_deadline = None
                return events[0]
            await self._receive()

    async def _receive(self) -> None:
        """Read once from the stream into the connection."""
        if self._conn.state is State.ERROR:
            # Our writer found the stream broken: the peer is gone, not misbehaving.
            raise trio.BrokenResourceError("connection lost while sending")
        if self._conn.buffered_bytes:
            # One deadline per frame, set when its first byte arrived: a sender dribbling
            # a byte at a time cannot hold the connection open.
            if self._frame_deadline is None:
                self._frame_deadline = trio.current_time() + self._config.frame_seconds
            with trio.fail_at(self._frame_deadline):
                data = await self._read()
        else:
            self._frame_deadline = None
            data = await self._read()
        self._conn.receive_data(data)

    async def _read(self) -> bytes | bytearray:
        """The next bytes from the peer (``b""`` at EOF).

        Plain TCP waits for readability, then reads the descriptor directly: one scheduler
        pass per read. ``SocketStream.receive_some`` tries the read first and, when it
        succeeds, still yields once more (trio's checkpoint guarantee), which costs a second
        pass for every read. Waiting first keeps this a checkpoint, so a peer that always has
        data ready cannot starve the facets.
        """
        if self._fd < 0:
            return await self._stream.receive_some(RECEIVE_BYTES_MAX)
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                return os.read(self._fd, RECEIVE_BYTES_MAX)
            except BlockingIOError:
                continue  # readiness without data (rare): wait again
            except OSError as exc:  # e.g. ECONNRESET
                raise trio.BrokenResourceError(f"connection lost: {exc}") from exc

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        bound = self._config.calls_in_flight_max
        # A call holds its slot until its reply is written, not just queued: a client that
        # sends but never reads can make us hold at most calls_in_flight_max replies.
        outbox_max = self._config.frame_bytes_max * 2
        conn = self._conn
        flight = self._flight
        while True:
            while len(self._pending) + self._unwritten >= bound or self._outbox_bytes > outbox_max:
                await self._wait_for_room()
            if flight.count >= flight.bound:
                # The tenant's bound, across its connections: read nothing more until one of
                # its calls is answered (backpressure; see runtime/_quotas.py).
                await flight.wait_for_room()
                continue
            # Every complete frame of what was read, as one batch (up to the free slots).
            room = bound - len(self._pending) - self._unwritten
            events = conn.next_events(min(room, flight.bound - flight.count))
            if not events:
                await self._receive()
                continue
            self._frame_deadline = None  # a frame completed; the next one gets its own
            if not self._dispatch_batch(events, nursery):
                return

    def _dispatch_batch(self, events: list[Event | Closed], nursery: trio.Nursery) -> bool:
        """Hand every event of one read to the runtime; False once the peer is done."""
        started = trio.current_time()  # one arrival time for the batch
        assert self._principal is not None
        # Revocation takes effect on the next batch read: a batch arrived at one instant.
        revoked = not self._server.system.is_active(self._principal)
        for event in events:
            if type(event) is Call:
                if revoked:
                    self._server.metrics.auth_failures.labels("tcp").inc()
                    error = UnauthorizedError("key was revoked")
                    self._answer(event.id, started, outcome.Error(error))
                else:
                    self._dispatch(event, nursery, started)
            elif isinstance(event, Ping):
                self._queue(Pong(id=event.id))
            elif isinstance(event, (Closed, Bye)):
                return False
            # Pong: nothing to do (we never ping first yet).
        return True

    # -- calls -------------------------------------------------------------------------

    def _dispatch(self, call: Call, nursery: trio.Nursery, started: float) -> None:
        if call.traceparent is not None and TRACEPARENT.fullmatch(call.traceparent) is None:
            error = BadRequestError(
                "trace must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
            )
            self._answer(call.id, started, outcome.Error(error))
            return
        try:
            # The session's own cache first: no method call and no (tenant, agent) key per call.
            address = self._addresses.get(call.agent)
            if address is None:
                address = self._core.address_of(self._tenant, call.agent)
                if len(self._addresses) >= SESSION_ADDRESSES_MAX:
                    self._addresses.clear()
                self._addresses[call.agent] = address
            reply = self._core.submit(
                address,
                call.method,
                call.args,
                call.kwargs,
                cls=call.cls,
                idempotency_key=call.idempotency_key,
                chain=(),
                callback=partial(self._answer, call.id, started),
                enqueued_at=started,
            )
        except FacetrtError as exc:
            self._answer(call.id, started, outcome.Error(exc))
            return
        assert not reply.is_set, "replies never arrive synchronously"
        self._flight.count += 1  # given back when the call leaves _pending (in _answer)
        if call.deadline_ms is None:
            self._pending[call.id] = None
            return
        scope = trio.CancelScope(deadline=started + call.deadline_ms / 1000)
        self._pending[call.id] = scope
        nursery.start_soon(self._expire, call.id, started, scope, reply)

    async def _expire(
        self, call_id: int, started: float, scope: trio.CancelScope, reply: ReplySlot
    ) -> None:
        with scope:
            await trio.sleep_forever()
        if scope.cancelled_caught and self._pending.get(call_id) is scope:
            # Not started yet: it is skipped. Already running: it completes, outcome unknown.
            reply.abandoned = True
            error = DeadlineExceededError("the call's deadline passed; it may or may not have run")
            self._answer(call_id, started, outcome.Error(error))

    def _answer(self, call_id: int, started: float, result: outcome.Outcome[Value]) -> None:
        """Encode the reply of ``call_id`` now and queue it (runs as the runtime's callback)."""
        scope = self._pending.pop(call_id, _ABSENT)
        if scope is not _ABSENT:
            flight = self._flight
            flight.count -= 1  # InFlight.give, inlined: once per call
            if flight.waiting:
                flight.give_waiters()
            if scope is not None:
                scope.cancel()
        if self._room_waiters:  # _wake_for_room, inlined: once per call
            self._room_waiters = 0
            self._room_lot.unpark_all()
        if type(result) is outcome.Value:
            code = "ok"
            try:
                data = self._conn.send_result(call_id, result.value)
            except LocalProtocolError as exc:
                if "exceeds" not in exc.message:
                    return  # the connection already failed: nobody to answer
                # Unreachable with a valid config (frame_bytes_max leaves room for the
                # largest value), kept as a guard: the call ran, its result cannot travel.
                error: FacetrtError = InternalError(
                    f"the result does not fit in a frame: {exc.message}"
                )
                code = error.code.value
                data = self._conn.send(error_reply(call_id, error))
        else:
            assert isinstance(result, outcome.Error)
            caught = result.error
            if isinstance(caught, FacetrtError):
                error = caught
            else:  # pragma: no cover - a bug elsewhere
                logger.error("non-facetrt error answered a call: %r", caught)
                error = InternalError("internal error")
            code = error.code.value
            try:
                data = self._conn.send(error_reply(call_id, error))
            except LocalProtocolError:
                return  # the connection already failed: nobody to answer
        self._server.metrics.observe_call("tcp", code, self._clock() - started)
        self._outbox.append(data)  # _append, inlined: once per call
        self._outbox_bytes += len(data)
        self._outbox_frames += 1
        self._unwritten += 1
        if self._core.releasing:
            # Released with a commit's batch: the after_release hook writes it (flush) and
            # wakes the writer task only if the socket did not take everything.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._server.dirty.append(self)
        else:
            self._wake_writer()  # an error answered at once, an expired deadline, a failure

    def _queue(self, event: Event) -> None:
        self._append(self._conn.send(event))
        self._wake_writer()

    def _append(self, data: bytes) -> None:
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        self._outbox_frames += 1
        self._unwritten += 1

    def detach(self) -> None:
        """The stream is about to close: never write to its descriptor again (the number
        may be reused by another file at once); late replies are dropped with the stream."""
        self._fd = -1

    def flush(self) -> None:
        """Write the outbox now from the loop thread, if the writer task is not sending.

        Runs after the runtime released a batch of replies: one ``write`` for all of them,
        without waiting a scheduler pass for the writer task (the latency of one call at a
        time). What the socket does not take at once is left to the writer task, woken here.
        """
        self._flush_scheduled = False
        if not self._outbox:
            return
        if self._fd >= 0 and not self._sending:
            data = self._outbox[0] if len(self._outbox) == 1 else b"".join(self._outbox)
            try:
                sent = os.write(self._fd, data)
            except OSError:
                sent = 0  # full (EAGAIN) or broken: the writer task finds out and handles it
            self._outbox_bytes -= sent
            if sent == len(data):
                self._outbox.clear()
                self._unwritten -= self._outbox_frames
                self._outbox_frames = 0
                self._wake_for_room()
                return
            # Its frames stay unwritten until the writer task sent the rest.
            self._outbox[:] = [data[sent:]]
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writer_parked:
            self._writer_parked = False  # woken: later replies need not wake it again
            self._writer_lot.unpark_all()

    def _wake_for_room(self) -> None:
        if self._room_waiters:
            self._room_waiters = 0  # all woken; each re-counts itself if it parks again
            self._room_lot.unpark_all()

    async def _wait_for_room(self) -> None:
        # Counted while parked; whoever wakes the lot resets the count (all are woken).
        self._room_waiters += 1
        await self._room_lot.park()

    # -- writing -----------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self._outbox:
                    if not self._reading and not self._pending:
                        return
                    self._writer_parked = True
                    try:
                        await self._writer_lot.park()
                    finally:
                        self._writer_parked = False
                    continue
                frames, self._outbox_frames = self._outbox_frames, 0
                data = b"".join(self._outbox)
                self._outbox.clear()
                self._sending = True
                try:
                    await self._stream.send_all(data)
                finally:
                    self._sending = False
                self._outbox_bytes -= len(data)
                self._unwritten -= frames
                self._wake_for_room()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._conn.send_failed()
            self._read_scope.cancel()
