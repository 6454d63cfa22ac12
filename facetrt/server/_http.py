"""The HTTP/JSON gateway: a minimal ASGI 3 app served by hypercorn's trio worker.

Routes (JSON in and out; SPEC §5, decision 0006)::

    POST /v1/facets/{tenant}/{agent...}/{method}   tenant key   {"args", "kwargs", "class"}
    GET  /healthz   GET /readyz   GET /metrics     no key
    /v1/admin/...                                  admin key (``_http_admin``)

The method is the last path segment and the agent id everything between the tenant and it
(agent ids may contain ``/``); each segment is percent-decoded on its own, so ``a%2Fb`` and
``a/b`` name the same agent. The tenant comes from the credential: a path naming another
tenant is ``forbidden`` and nothing is called. ``Idempotency-Key`` is passed to the runtime;
``traceparent`` is checked (loosely) and otherwise unused for now. An unknown path is
``not_found`` (404). Values, errors and bodies: see ``_http_exchange``.

Facet calls are refused ``unavailable`` (503) while the node is not ready (starting or
draining), and counted in ``facetrt_calls_total{surface="http"}`` whatever their outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import TYPE_CHECKING, Final, final

import hypercorn.config
import prometheus_client
import trio

from .._errors import (
    BadRequestError,
    ConfigError,
    FacetrtError,
    ForbiddenError,
    HandlerError,
    InternalError,
    NotFoundError,
    UnauthorizedError,
    UnavailableError,
)
from ._http_admin import ADMIN_ROUTES, EXCHANGE_ROUTES, AdminApi, resolve_admin_route
from ._http_connections import HttpConnections
from ._http_exchange import (
    JSON_TYPE,
    ASGIApp,
    Disconnected,
    Exchange,
    Message,
    Receive,
    Refusal,
    Send,
    dump_json,
    parse_call_body,
    to_json,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .._values import Value
    from ..config import ServerConfig
    from ..metrics import FacetrtMetrics
    from ..policy import Egress
    from ..runtime import Runtime
    from ..storage import Principal, SystemStore
    from ._auth import AuthThrottle
    from ._daemon import Health

logger = logging.getLogger(__name__)

GRACEFUL_SECONDS: Final = 5.0
# A loose W3C trace-context check: version (not ff), trace id, parent id, flags, and whatever
# later versions append. Ids of all zeros are invalid.
TRACEPARENT: Final = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-[^\s]*)?"
)


# -- serving -------------------------------------------------------------------------------


def hypercorn_config(bind: str, *, keep_alive_seconds: float = 30.0) -> hypercorn.config.Config:
    """Hypercorn settings: quiet, bounded, quick to stop."""
    host, port = _split_host_port(bind)
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # one log line per request is noise at this rate; metrics count
    config.errorlog = logging.getLogger("facetrt.server.hypercorn")  # our logging setup
    config.include_server_header = False
    # Longer than client pools keep idle connections (httpx 5 s, aiohttp 15 s), so a client
    # rarely reuses a connection we are closing. It also bounds a slow request head: the
    # idle timer runs from the connection's start (or the last response) until a complete
    # head arrived, so a client dribbling its headers is closed when it fires.
    config.keep_alive_timeout = keep_alive_seconds
    config.keep_alive_max_requests = 100_000
    config.h11_max_incomplete_size = 16 * 1024  # request line and headers
    config.h2_max_concurrent_streams = 100
    config.max_app_queue_size = 8  # body chunks (<= 64 KiB each) queued per request
    config.backlog = 1024
    config.graceful_timeout = GRACEFUL_SECONDS
    config.startup_timeout = config.shutdown_timeout = GRACEFUL_SECONDS
    # read_timeout stays None: it would cut connections whose call takes longer. Slow bodies
    # are bounded by the app (frame_seconds); slow heads and idle connections by
    # keep_alive_timeout; open connections by HttpConnections (hypercorn has no limit).
    return config


async def serve_http(
    app: ASGIApp,
    server: ServerConfig,
    shutdown: trio.Event,
    *,
    metrics: FacetrtMetrics | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``server.http`` ("HOST:PORT", port 0 picks one) until ``shutdown``.

    Reports the bound (host, port) through ``task_status``. At most
    ``server.http_connections_max`` connections are served at once; more are answered 429
    ``overloaded`` and closed. On shutdown it stops accepting, closes idle connections and
    gives requests in flight ``GRACEFUL_SECONDS``.

    Raises:
        ConfigError: ``server.http`` is not HOST:PORT.
    """
    assert server.http
    config = hypercorn_config(server.http, keep_alive_seconds=server.http_keep_alive_seconds)
    connections = HttpConnections(
        app, config, connections_max=server.http_connections_max, metrics=metrics
    )
    await connections.serve(shutdown, task_status=task_status)


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_app(
    *,
    runtime: Runtime,
    system: SystemStore,
    metrics: FacetrtMetrics,
    health: Health,
    config: ServerConfig,
    throttle: AuthThrottle,
    admin_key_path: Path,
    egress: Egress | None = None,
) -> ASGIApp:
    """The gateway's ASGI app over the daemon's parts (``admin_key_path``: the file the
    admin key rotation route writes)."""
    return HttpGateway(
        runtime=runtime,
        system=system,
        metrics=metrics,
        health=health,
        config=config,
        throttle=throttle,
        admin_key_path=admin_key_path,
        egress=egress,
    )


# -- the app -------------------------------------------------------------------------------


@final
class HttpGateway:
    """The gateway's ASGI app: routes each request, answers every failure as SPEC §4 JSON."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        system: SystemStore,
        metrics: FacetrtMetrics,
        health: Health,
        config: ServerConfig,
        throttle: AuthThrottle,
        admin_key_path: Path,
        egress: Egress | None = None,
    ) -> None:
        self._runtime = runtime
        self._system = system
        self._metrics = metrics
        self._health = health
        self._config = config
        self._throttle = throttle
        self._admin = AdminApi(
            runtime=runtime, system=system, admin_key_path=admin_key_path, egress=egress
        )

    async def __call__(self, scope: Message, receive: Receive, send: Send, /) -> None:
        kind = scope["type"]
        if kind == "http":
            exchange = Exchange(scope, receive, send, self._config)
            try:
                await self._route(exchange)
            except Disconnected:
                pass
            except Exception:
                # A bug: log it (never the body or the key) and answer like any error.
                logger.exception("bug while answering %s %s", exchange.method, exchange.route)
                if not exchange.started:
                    await exchange.respond_error(InternalError("internal error"))
        elif kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _route(self, x: Exchange) -> None:
        try:
            segments = x.path_segments()
        except BadRequestError as exc:
            await x.respond_error(exc)
            return
        if segments[:2] == ["v1", "facets"] and len(segments) >= 5:
            await self._facet_call(x, segments[2], "/".join(segments[3:-1]), segments[-1])
            return
        try:
            if segments[:2] == ["v1", "admin"]:
                await self._admin_call(x, segments[2:])
            elif segments == ["healthz"]:
                x.check_method("GET")
                await x.respond_json(200, {"status": "ok"})
            elif segments == ["readyz"]:
                x.check_method("GET")
                health = self._health
                saturation = self._runtime.saturation()
                state = {
                    "ready": health.ready,
                    "draining": health.draining,
                    # Reported, not a reason to be unready (decision 0010).
                    "saturated": saturation.saturated,
                    "saturation": dataclasses.asdict(saturation),
                }
                await x.respond_json(200 if health.ready else 503, state)
            elif segments == ["metrics"]:
                x.check_method("GET")
                text = prometheus_client.generate_latest(self._metrics.registry)
                await x.respond(200, text, prometheus_client.CONTENT_TYPE_LATEST.encode())
            else:
                raise NotFoundError(f"no route for {x.method} {x.path!r}")
        except Refusal as refusal:
            await x.respond_error(refusal.error, refusal.status, allow=refusal.allow)
        except FacetrtError as exc:
            await x.respond_error(exc)

    # -- facet calls ---------------------------------------------------------------------

    async def _facet_call(self, x: Exchange, tenant: str, agent: str, method: str) -> None:
        started = trio.current_time()
        code: str | None = None  # stays None when the client left or we were cancelled
        try:
            x.check_method("POST")
            result = await self._call(x, tenant, agent, method)
            try:
                body = dump_json({"result": to_json(result)})
            except ValueError as exc:
                raise HandlerError(
                    f"the result cannot be sent as JSON ({exc}); the call ran and its writes "
                    "are kept",
                    type_name="ValueError",
                ) from None
        except Refusal as refusal:
            code = refusal.error.code.value
            await x.respond_error(refusal.error, refusal.status, allow=refusal.allow)
        except FacetrtError as exc:
            code = exc.code.value
            await x.respond_error(exc)
        else:
            code = "ok"
            await x.respond(200, body, JSON_TYPE)
        finally:
            if code is not None:
                self._metrics.observe_call("http", code, trio.current_time() - started)

    async def _call(self, x: Exchange, tenant: str, agent: str, method: str) -> Value:
        principal = await self._authenticate(x)
        if principal.tenant is None:
            raise ForbiddenError("the admin key cannot call facets; use a tenant key")
        if principal.tenant != tenant:
            raise ForbiddenError("this key does not belong to the tenant in the path")
        if not self._health.ready:
            raise UnavailableError("the node is starting or draining; retry on another node")
        idempotency_key = x.single_header(b"idempotency-key")
        traceparent = x.single_header(b"traceparent")
        if traceparent is not None and TRACEPARENT.fullmatch(traceparent) is None:
            raise BadRequestError("traceparent is not a W3C trace context header")
        args, kwargs, cls = parse_call_body(await x.read_json())
        core = self._runtime.core
        address = core.address_of(tenant, agent)  # validated once, cached
        flight = core.quotas.in_flight(tenant)
        while flight.count >= flight.bound:
            await flight.wait_for_room()  # the tenant's bound (backpressure, as over TCP)
        flight.count += 1
        try:
            return await core.call(
                address, method, args, kwargs, cls=cls, idempotency_key=idempotency_key, chain=()
            )
        finally:
            flight.give()

    async def _authenticate(self, x: Exchange) -> Principal:
        """The principal of the request's bearer key (counted and throttled when refused)."""
        authorization = x.headers.get(b"authorization")
        scheme, _, key = (authorization or b"").decode("latin-1").partition(" ")
        try:
            if authorization is None or scheme.lower() != "bearer":
                raise UnauthorizedError("send Authorization: Bearer <key>")
            principal = self._system.authenticate(key.strip())
        except UnauthorizedError:
            self._metrics.auth_failures.labels("http").inc()
            await self._throttle.failed(x.peer)
            raise
        self._throttle.succeeded(x.peer)
        return principal

    # -- admin -----------------------------------------------------------------------------

    async def _admin_call(self, x: Exchange, segments: list[str]) -> None:
        route = resolve_admin_route(segments)
        if route is None:
            raise NotFoundError(f"no route for {x.method} {x.path!r}")
        name, params = route
        x.check_method(*ADMIN_ROUTES[name])
        principal = await self._authenticate(x)
        if not principal.is_admin:
            raise ForbiddenError("admin routes need the admin key")
        if name in EXCHANGE_ROUTES:
            await self._admin.handle_exchange(name, x, params)
            return
        body = await x.read_json() if x.method in ("POST", "PUT") else None
        status, payload = await self._admin.handle(name, x.method, params, x.query(), body)
        await x.respond_json(status, payload)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to set up or tear down: the daemon owns every resource."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
