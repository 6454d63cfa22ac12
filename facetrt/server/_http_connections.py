"""The HTTP gateway's accept loop: hypercorn's per-connection handler behind a connection limit.

hypercorn has no bound on open connections: its trio worker hands every accepted socket to
``trio.serve_listeners``. A client opening connections and holding them (a connection flood)
would grow the daemon's tasks, buffers and descriptors without limit. So the daemon accepts
HTTP connections itself and runs hypercorn's own connection handler (``TCPServer``: h11, h2,
keep-alive, the ASGI hand-off) on each, at most ``http_connections_max`` at once. A connection
over the limit gets a complete ``429`` answer with the SPEC §4 body (code ``overloaded``,
retryable, ``Retry-After: 1``, ``Connection: close``) and is closed; no task of hypercorn's
runs for it (decision 0011).

Shutdown mirrors hypercorn's worker: stop accepting, tell every connection the worker is
terminating (idle keep-alive connections close at once, busy ones after their response), and
give them ``graceful_timeout`` before they are cancelled.

The ASGI lifespan protocol is not run: the gateway's app owns nothing that needs it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Final, cast, final

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from .._errors import ConfigError, OverloadedError
from .._json import dump_json

if TYPE_CHECKING:
    import hypercorn.config
    from hypercorn.typing import ASGIFramework

    from ..metrics import FacetrtMetrics
    from ._http_exchange import ASGIApp

logger = logging.getLogger(__name__)

# How long a refused connection may take to receive its answer (a client that does not read
# cannot hold the refusal's task longer), and how much of its request is read and dropped so
# that closing does not reset the connection before the client has read the answer.
REFUSAL_SECONDS: Final = 1.0
REFUSAL_DRAIN_BYTES: Final = 64 * 1024
ACCEPT_BACKOFF_SECONDS: Final = 0.1


def refusal_response(connections_max: int) -> bytes:
    """The complete HTTP/1.1 answer to a connection over the limit."""
    error = OverloadedError(
        f"the HTTP gateway has {connections_max} connections open, its limit; retry later"
    )
    body = dump_json(
        {"error": {"code": error.code.value, "message": error.message, "retryable": True}}
    )
    head = (
        "HTTP/1.1 429 Too Many Requests\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "cache-control: no-store\r\n"
        "retry-after: 1\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Connection(TCPServer):
    """hypercorn's connection handler, ending as soon as the connection has.

    hypercorn starts a keep-alive timer when a connection opens and stops it only when a
    request arrives; a connection that ends without a complete request (the peer closed, or
    hypercorn refused a malformed head and closed) still waits for that timer before its task
    ends. Under a connection limit that would let a client hold every slot with connections
    it has already closed: opening and closing a connection per second per slot would do.
    """

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            await self.idle_task.stop()


@final
class HttpConnections:
    """Accepts HTTP connections and serves each with hypercorn, at most ``connections_max``."""

    def __init__(
        self,
        app: ASGIApp,
        config: hypercorn.config.Config,
        *,
        connections_max: int,
        metrics: FacetrtMetrics | None,
    ) -> None:
        self._app = ASGIWrapper(cast("ASGIFramework", app))
        self._config = config
        self._connections_max = connections_max
        self._metrics = metrics
        self._context = WorkerContext(None)
        self._state = ConnectionState({})
        self._refusal = refusal_response(connections_max)
        self.open = 0  # connections being served (refused ones not counted)
        self.refused = 0

    async def serve(
        self,
        shutdown: trio.Event,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on the configured bind until ``shutdown`` is set, then drain (bounded)."""
        listeners = []
        for bind in self._config.bind:
            sock = _listening_socket(bind, self._config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener, connections)
                task_status.started((str(host), int(port)))
                await shutdown.wait()
                accepting.cancel_scope.cancel()
            await self._context.terminated.set()
            graceful = trio.current_time() + self._config.graceful_timeout
            connections.cancel_scope.deadline = graceful

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                    logger.warning("HTTP accept failed: %s", exc)
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                if self.open >= self._connections_max:
                    self.refused += 1
                    if self._metrics is not None:
                        self._metrics.connections_refused.labels("http").inc()
                    connections.start_soon(self._refuse, stream)
                else:
                    self.open += 1
                    connections.start_soon(self._serve_one, stream)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        metrics = self._metrics
        if metrics is not None:
            metrics.connections_accepted.labels("http").inc()
            metrics.connections.labels("http").inc()
        try:
            await _Connection(self._app, self._config, self._context, self._state, stream)  # type: ignore[arg-type]  # hypercorn types the stream as SSLStream; it takes plain ones too
        finally:
            self.open -= 1
            if metrics is not None:
                metrics.connections.labels("http").dec()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer 429 and close; bounded in time whatever the client does."""
        with trio.move_on_after(REFUSAL_SECONDS):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(self._refusal)
                await stream.send_eof()
                drained = 0
                while drained < REFUSAL_DRAIN_BYTES:
                    data = await stream.receive_some(REFUSAL_DRAIN_BYTES)
                    if not data:
                        break
                    drained += len(data)
        await trio.aclose_forcefully(stream)


def _listening_socket(bind: str, backlog: int) -> socket.socket:
    """A listening TCP socket on ``bind`` ("HOST:PORT", brackets around an IPv6 host), as
    hypercorn's ``Config.create_sockets`` makes it (TCP_NODELAY, SO_REUSEADDR, non-blocking),
    but closed again when it cannot bind: hypercorn's leaks it, and the error is one line.

    Raises:
        ConfigError: the port is taken, or the address is not this host's.
    """
    host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen for HTTP on {bind}: {exc.strerror or exc}") from None
    return sock
