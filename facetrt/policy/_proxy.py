"""The egress proxy: an HTTP forward proxy on loopback for the processes the runtime starts.

A process gets a per-run credential (:meth:`ProxyCredentials.issue`: tenant, agent, run) and
``HTTP_PROXY``/``HTTPS_PROXY=http://USER:PASSWORD@127.0.0.1:PORT``. Every request must carry
it (``Proxy-Authorization: Basic``); it decides whose policy, secrets and audit log apply.
HTTP is parsed by h11; nothing here parses HTTP by hand.

- ``CONNECT host:port``: a tunnel, decided by host and port only (an allow rule limiting
  neither methods nor paths), the destination address checked and the attempt audited like a
  fetch, then bytes are relayed both ways (bounded by ``proxy_tunnel_seconds_max``); the
  audit record is completed with the bytes each way. Secrets cannot be injected into a tunnel.
- ``GET http://...`` or ``GET https://...`` (absolute form): the full egress path of
  ``self.fetch`` (policy per request, secrets substituted for bound hosts, checked address,
  audit, limits), sent over TLS for ``https://`` targets, so a tool that wants a secret
  injected sends its https request to the proxy in plain form. Redirects are returned to the
  client (it follows them, through the proxy again). The response is relayed with the
  tenant's secrets redacted.

Answers: 407 (no or wrong credential), 403 (policy: JSON body with the rule), 502 (the
destination failed), 400 (malformed, or an origin-form request), 413 (body too large).
Bounds: ``proxy_connections_max`` connections (more are refused at once), request heads of
16 KiB, bodies of ``request_bytes_max``, idle connections closed after ``IDLE_SECONDS``, and
a request head must be complete within ``IDLE_SECONDS`` of the last request.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Final, final

import h11
import trio

from .._errors import BadRequestError, ConfigError, FacetrtError, PolicyViolationError
from .._fetch import FetchError, FetchRequest
from ._decide import deny
from ._model import check_proxy_listen

if TYPE_CHECKING:
    from ._credentials import Caller, ProxyCredentials
    from ._egress import Egress

logger = logging.getLogger(__name__)

IDLE_SECONDS: Final = 30.0
HEAD_BYTES_MAX: Final = 16 * 1024
RECEIVE_BYTES: Final = 64 * 1024
REALM: Final = b'Basic realm="facetrt-egress"'
# Not forwarded: hop-by-hop headers and the proxy's own.
HOP_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
# Not relayed back: framing is ours, and the body was decoded.
RESPONSE_DROPPED: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)
CREDENTIALS_DENIED: Final = deny(
    "proxy-credentials", "credentials", "missing, wrong or expired proxy credential"
)


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


@final
class EgressProxy:
    """The proxy service: ``await nursery.start(proxy.run)`` returns (host, port)."""

    def __init__(self, egress: Egress, credentials: ProxyCredentials) -> None:
        self._egress = egress
        self._config = egress.config
        self.credentials = credentials
        self._connections = trio.CapacityLimiter(self._config.proxy_connections_max)

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``proxy_listen`` (loopback only) until cancelled.

        Raises:
            ConfigError: not HOST:PORT, or not a loopback address.
        """
        listen = self._config.proxy_listen
        assert listen is not None
        try:
            check_proxy_listen(listen)  # validated with the configuration; kept for callers
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        host, _, port_text = listen.rpartition(":")
        host = host.strip("[]")
        try:
            listeners = await trio.open_tcp_listeners(int(port_text), host=host)
        except OSError as exc:  # the port is taken, or the address is not this host's
            raise ConfigError(
                f"cannot listen for the egress proxy on {listen}: {exc.strerror or exc}"
            ) from None
        address = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            task_status.started((str(address[0]), int(address[1])))
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            self._connections.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            await stream.aclose()  # full: refuse at once rather than queue
            return
        try:
            await self._connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:  # the connection handler's catch-all (STYLE §5): log, close
            logger.exception("egress proxy connection failed; closing it")
        finally:
            self._connections.release_on_behalf_of(stream)
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_BYTES_MAX)
        while True:
            try:
                # The whole head within IDLE_SECONDS, not only each read: the credential is
                # checked once the head is in, so a trickling peer must not hold a slot longer.
                event = None
                with trio.move_on_after(IDLE_SECONDS):
                    event = await self._next(stream, conn)
            except h11.RemoteProtocolError as exc:
                await self._refuse(stream, conn, _Refused(400, "bad_request", str(exc), close=True))
                return
            if not isinstance(event, h11.Request):
                return  # closed, or idle too long
            try:
                tunnel = await self._handle(stream, conn, event)
            except _Refused as refused:
                await self._refuse(stream, conn, refused)
                if refused.close:
                    return
                tunnel = False
            if tunnel or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _next(self, stream: trio.SocketStream, conn: h11.Connection) -> h11.Event | None:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # h11's sentinels are classes
            with trio.move_on_after(IDLE_SECONDS):
                conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
                continue
            return None

    async def _handle(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request
    ) -> bool:
        """Answer one request; True if it became a tunnel (the connection is then done)."""
        headers = dict(request.headers)
        caller = self._caller(headers.get(b"proxy-authorization"))
        if request.method == b"CONNECT":
            await self._tunnel(stream, conn, caller, request.target.decode("ascii", "replace"))
            return True
        target = request.target.decode("ascii", "replace")
        if not target.startswith(("http://", "https://")):
            raise _Refused(400, "bad_request", "a proxy request names an absolute http(s) URL")
        body = await self._body(stream, conn)
        forwarded = tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers
            if name not in HOP_HEADERS
        )
        fetch = FetchRequest(
            url=target, method=request.method.decode("ascii"), headers=forwarded, body=body or None
        )
        try:
            response = await self._egress.request(caller, fetch, follow_redirects=False)
        except PolicyViolationError as exc:
            raise _Refused(403, "policy_violation", exc.message) from None
        except FetchError as exc:
            raise _Refused(502, "external_api_error", exc.message) from None
        except BadRequestError as exc:
            raise _Refused(400, "bad_request", exc.message) from None
        except FacetrtError as exc:  # the audit log failed: nothing was sent
            raise _Refused(500, exc.code.value, exc.message, close=True) from None
        redactor = self._egress.secrets.for_tenant(caller.tenant).redactor
        payload = redactor.data(response.body)
        out = [
            (name.encode("latin-1"), redactor.header(value).encode("latin-1"))
            for name, value in response.headers
            if name not in RESPONSE_DROPPED
        ]
        out.append((b"content-length", str(len(payload)).encode()))
        await self._send(stream, conn, h11.Response(status_code=response.status, headers=out))
        await self._send(stream, conn, h11.Data(data=payload))
        await self._send(stream, conn, h11.EndOfMessage())
        return False

    def _caller(self, header: bytes | None) -> Caller:
        caller = self.credentials.check(header)
        if caller is None:
            self._egress.counters.decided("proxy", CREDENTIALS_DENIED)
            raise _Refused(407, "unauthorized", "proxy credential missing, wrong or expired")
        return caller

    async def _body(self, stream: trio.SocketStream, conn: h11.Connection) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next(stream, conn)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._config.request_bytes_max:
                    raise _Refused(413, "bad_request", "request body too large", close=True)
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _Refused(400, "bad_request", "incomplete request body", close=True)

    async def _tunnel(
        self, stream: trio.SocketStream, conn: h11.Connection, caller: Caller, authority: str
    ) -> None:
        host, sep, port_text = authority.rpartition(":")
        if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _Refused(400, "bad_request", "CONNECT needs host:port", close=True)
        try:
            upstream, record = await self._egress.open_tunnel(
                caller, host.strip("[]"), int(port_text)
            )
        except PolicyViolationError as exc:
            raise _Refused(403, "policy_violation", exc.message, close=True) from None
        except FetchError as exc:
            raise _Refused(502, "external_api_error", exc.message, close=True) from None
        except FacetrtError as exc:  # the audit log failed: nothing was sent
            raise _Refused(500, exc.code.value, exc.message, close=True) from None
        started = time.perf_counter()
        counts = [0, 0]  # bytes client -> destination, destination -> client
        error: str | None = None
        try:
            await self._send(stream, conn, h11.Response(status_code=200, headers=[]))
            leftover, _closed = conn.trailing_data
            if leftover:
                await upstream.send_all(leftover)
                counts[0] += len(leftover)
            with trio.move_on_after(self._config.proxy_tunnel_seconds_max) as limit:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_relay, stream, upstream, counts, 0, nursery.cancel_scope)
                    nursery.start_soon(_relay, upstream, stream, counts, 1, nursery.cancel_scope)
            if limit.cancelled_caught:
                error = "timeout"
        except BaseException:
            error = "cancelled"
            raise
        finally:
            self._egress.close_tunnel(
                record,
                bytes_out=counts[0],
                bytes_in=counts[1],
                seconds=time.perf_counter() - started,
                error=error,
            )
            with trio.move_on_after(1, shield=True):
                await upstream.aclose()

    async def _refuse(
        self, stream: trio.SocketStream, conn: h11.Connection, refused: _Refused
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps(
            {"error": {"code": refused.code, "message": refused.message, "retryable": False}}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if refused.status == 407:
            headers.append((b"proxy-authenticate", REALM))
        if refused.close:
            headers.append((b"connection", b"close"))
        try:
            await self._send(
                stream, conn, h11.Response(status_code=refused.status, headers=headers)
            )
            await self._send(stream, conn, h11.Data(data=body))
            await self._send(stream, conn, h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        if not refused.close and conn.their_state is not h11.DONE:
            # The body of the refused request is still coming: skip it (bounded) or close.
            try:
                await self._body(stream, conn)
            except _Refused:
                refused.close = True

    async def _send(
        self, stream: trio.SocketStream, conn: h11.Connection, event: h11.Event
    ) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)


async def _relay(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    counts: list[int],
    index: int,
    scope: trio.CancelScope,
) -> None:
    """Copy bytes one way until EOF or an error, then end the tunnel both ways."""
    try:
        while data := await source.receive_some(RECEIVE_BYTES):
            await sink.send_all(data)
            counts[index] += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        scope.cancel()
