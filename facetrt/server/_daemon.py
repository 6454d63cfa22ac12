"""The daemon: builds every part from a DaemonConfig, serves, and owns shutdown.

Startup: load classes → lock the data directory and open the runtime → open the system store
(tenants, keys) and create the admin key on first start → listen (TCP, HTTP) → ready.

Shutdown (SIGTERM, SIGINT or :meth:`Daemon.stop`): readiness off → stop accepting → every
connection stops reading new calls and answers those in flight (within
``shutdown_grace_seconds``; then they are cancelled and answered ``unavailable``) → the
runtime drains its mailboxes, flushes commits and closes every environment → exit.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, final

import trio
from prometheus_client import CollectorRegistry

from .._errors import ConfigError, FacetrtError
from ..config import TenantQuotaSettings
from ..data import DataOperations
from ..metrics import FacetrtMetrics
from ..policy import Egress, EgressProxy, NodeKey, RedactingFilter, Redactor
from ..runtime import Facet, open_runtime
from ..storage import SystemStore
from ._admin_key import ensure_admin_key
from ._auth import AuthThrottle
from ._tcp import TcpServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from ..config import DaemonConfig
    from ..runtime import Runtime

logger = logging.getLogger(__name__)

GC_THRESHOLD_YOUNG = 20_000


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonInfo:
    """Where a started daemon listens (ports resolved when 0 was asked for)."""

    tcp_address: tuple[str, int]
    http_address: tuple[str, int] | None
    proxy_address: tuple[str, int] | None
    admin_key_path: Path
    data_dir: Path


@final
class Health:
    """Liveness and readiness, as `/healthz` and `/readyz` report them."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False


def resolve_classes(spec: Mapping[str, str]) -> dict[str, type[Facet]]:
    """Import ``{"Name": "module:attribute"}``.

    Raises:
        ConfigError: a module or attribute is missing or not a Facet subclass.
    """
    classes: dict[str, type[Facet]] = {}
    for name, target in spec.items():
        module_name, _, attribute = target.partition(":")
        try:
            value = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"class {name!r}: cannot import {target!r}: {exc}") from exc
        if not (isinstance(value, type) and issubclass(value, Facet)):
            raise ConfigError(f"class {name!r}: {target!r} is not a Facet subclass")
        classes[name] = value
    return classes


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_tenant_quotas(runtime: Runtime, system: SystemStore) -> None:
    """Give the runtime every tenant's stored quota overrides before serving.

    A record that no longer validates (a bound tightened by an upgrade) is logged and left
    out: that tenant gets the node defaults until the operator sets its quotas again.
    """
    for tenant, stored in system.all_tenant_quotas().items():
        try:
            runtime.set_tenant_quotas(tenant, TenantQuotaSettings.parse(stored))
        except FacetrtError as exc:
            logger.warning("ignoring the stored quotas of tenant %s: %s", tenant, exc.message)


@contextlib.contextmanager
def redacted_logs(redactor: Callable[[], Redactor]) -> Iterator[None]:
    """Pass every record reaching the root logger's handlers through the redaction filter
    (secret values of every tenant, token shapes) while the daemon runs."""
    log_filter = RedactingFilter(redactor)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)


@final
class Daemon:
    """One `facetrt serve` process. ``await nursery.start(daemon.run)`` returns DaemonInfo."""

    def __init__(self, config: DaemonConfig, *, tune_gc: bool = False) -> None:
        self.config = config
        self._tune_gc = tune_gc
        self.health = Health()
        self.registry = CollectorRegistry(auto_describe=True)
        self.runtime: Runtime | None = None  # set while running (for embedding and tests)
        self.system: SystemStore | None = None
        self.egress: Egress | None = None  # set while running
        self._stop = trio.Event()

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with redacted_logs(lambda: self.egress.secrets.redactor() if self.egress else Redactor()):
            await self._run(handle_signals, task_status)

    async def _run(self, handle_signals: bool, task_status: trio.TaskStatus[DaemonInfo]) -> None:
        config = self.config
        classes = resolve_classes(config.classes)
        data_dir = Path(config.data_dir)
        # Built here, started in _serve (it writes nothing before a fetch, which needs the
        # runtime and therefore the data directory's lock).
        egress = Egress(config.egress, data_dir=data_dir)
        async with open_runtime(
            data_dir, classes=classes, config=config.runtime, egress=egress
        ) as runtime:
            system = SystemStore(data_dir / "system")
            self.runtime, self.system, self.egress = runtime, system, egress
            try:
                await self._serve(runtime, system, egress, data_dir, handle_signals, task_status)
            finally:
                self.runtime = self.system = self.egress = None
                system.close()
        logger.info("facetrt stopped")

    async def _serve(
        self,
        runtime: Runtime,
        system: SystemStore,
        egress: Egress,
        data_dir: Path,
        handle_signals: bool,
        task_status: trio.TaskStatus[DaemonInfo],
    ) -> None:
        config = self.config.server
        admin_key_path = ensure_admin_key(system, data_dir)
        load_tenant_quotas(runtime, system)
        egress.policies.load(system)
        egress.node_key = NodeKey.load_or_create(data_dir, sealed=len(system.secrets()))
        egress.secrets.load(system, egress.node_key)
        await DataOperations(runtime, system=system).start()  # clear crashed operations' scratch
        metrics = FacetrtMetrics(self.registry, runtime.statistics, egress=egress.statistics)
        throttle = AuthThrottle(
            failures_free=config.auth_failures_free,
            delay_seconds_max=config.auth_delay_seconds_max,
        )
        tcp = TcpServer(
            runtime=runtime, system=system, config=config, metrics=metrics, throttle=throttle
        )
        http_shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(egress.run)
            proxy_address = None
            if self.config.egress.proxy_listen:
                proxy = EgressProxy(egress, egress.proxy_credentials)
                proxy_address = await nursery.start(proxy.run)
            host, port = parse_host_port(config.listen)
            try:
                listeners: list[trio.SocketListener] = await trio.open_tcp_listeners(
                    port, host=host
                )
            except OSError as exc:  # the port is taken, or the address is not this host's
                raise ConfigError(
                    f"cannot listen for the protocol on {config.listen}: {exc.strerror or exc}"
                ) from None
            tcp_address = listeners[0].socket.getsockname()[:2]
            accept_scope = trio.CancelScope()
            nursery.start_soon(self._accept, tcp, self._wrap_tls(listeners), nursery, accept_scope)
            http_address = None
            http_done = trio.Event()
            if not config.http:
                http_done.set()
            else:
                from ._http import build_app, serve_http

                app = build_app(
                    runtime=runtime,
                    system=system,
                    metrics=metrics,
                    health=self.health,
                    config=config,
                    throttle=throttle,
                    egress=egress,
                    admin_key_path=admin_key_path,
                )

                async def run_http(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                    try:
                        await serve_http(
                            app, config, http_shutdown, metrics=metrics, task_status=task_status
                        )
                    finally:
                        http_done.set()

                http_address = await nursery.start(run_http)
            if handle_signals:
                nursery.start_soon(self._watch_signals)
            # Everything allocated so far (modules, config, classes) lives as long as the
            # process: move it out of the collector's sight so full collections stay short.
            # Process-wide, so only when this daemon owns the process (`facetrt serve`).
            if self._tune_gc:
                gc.freeze()
                # Calls allocate many short-lived containers; the default first-generation
                # threshold (700) runs a collection every few dozen calls. Fewer, larger young
                # collections cost less per call; nothing of ours relies on prompt cycle
                # collection. (+15% calls/s on P1, docs/performance.md.)
                gc.set_threshold(GC_THRESHOLD_YOUNG, 20, 20)
            self.health.ready = True
            logger.info(
                "facetrt serving: protocol on %s:%d, HTTP on %s, data in %s, admin key in %s",
                tcp_address[0],
                tcp_address[1],
                http_address,
                data_dir,
                admin_key_path,
            )
            task_status.started(
                DaemonInfo(
                    tcp_address=(str(tcp_address[0]), int(tcp_address[1])),
                    http_address=http_address,
                    proxy_address=proxy_address,
                    admin_key_path=admin_key_path,
                    data_dir=data_dir,
                )
            )
            await self._stop.wait()
            logger.info("facetrt draining")
            self.health.ready = False
            self.health.draining = True
            accept_scope.cancel()
            http_shutdown.set()  # stop accepting; requests in progress finish
            with trio.move_on_after(self.config.runtime.shutdown_grace_seconds):
                await tcp.drain()
                await http_done.wait()
            # Drain the runtime while the egress still runs: messages finishing now may fetch.
            await runtime.aclose()
            nursery.cancel_scope.cancel()

    async def _accept(
        self,
        tcp: TcpServer,
        listeners: list[trio.abc.Listener[trio.abc.Stream]],
        connections: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            await tcp.serve(listeners, connections)

    def _wrap_tls(
        self, listeners: list[trio.SocketListener]
    ) -> list[trio.abc.Listener[trio.abc.Stream]]:
        config = self.config.server
        if config.tls_cert_file is None:
            return list(listeners)
        if config.tls_key_file is None:
            raise ConfigError("tls_cert_file needs tls_key_file")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        return [
            trio.SSLListener(listener, context, https_compatible=False) for listener in listeners
        ]

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.stop()
                return
