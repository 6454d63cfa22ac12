"""The connection layer of egress: resolve once, connect only to the checked address.

httpx builds requests and decodes responses; this module is its transport. The caller
resolves the host itself (:func:`resolve`), checks every address against the policy, and
passes the allowed ones with the request (extension ``ADDRESSES``). The transport connects to
exactly those, in order, through one httpcore connection pool per destination address whose
network backend dials that address whatever host the URL names. TLS still verifies the URL's
host name (SNI and certificate), and the ``Host`` header is the URL's host. So a rebinding DNS
server cannot move a connection after the check: nothing resolves the name a second time.

Pools are kept (keep-alive) per address, at most ``pools_max`` (idle pools closed first; a
pool with requests in flight is never closed under them), each with at most
``connections_per_pool_max`` connections. Proxy settings of the environment are ignored.
"""

from __future__ import annotations

import collections
import socket
import ssl
from functools import partial
from typing import TYPE_CHECKING, Final, final

import httpcore
import httpx
import trio

from .._fetch import FetchError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

    from ._model import EgressConfig

ADDRESSES: Final = "facetrt.addresses"
KEEPALIVE_SECONDS: Final = 30.0


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (one lookup, in the resolver's order, no repeats).

    Raises:
        FetchError: the name does not resolve (kind ``dns``).
    """
    try:
        answers = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror and friends
        raise FetchError(f"cannot resolve {host!r}: {exc}", kind="dns") from None
    found: list[str] = []
    for _family, _type, _proto, _canonical, sockaddr in answers:
        text = str(sockaddr[0]).split("%", 1)[0]
        if text not in found:
            found.append(text)
    if not found:
        raise FetchError(f"{host!r} has no addresses", kind="dns")
    return found


def ssl_context(config: EgressConfig) -> ssl.SSLContext:
    """The system's trust store, plus ``config.ca_file`` if set."""
    context = ssl.create_default_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    return context


@final
class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Dials one fixed address, whatever host httpcore asks for (the URL's name)."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._backend = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # trio resolves an IP literal locally (AI_NUMERICHOST-like): no DNS query leaves.
        return await self._backend.connect_tcp(
            self._address, port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not an egress destination")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


@final
class PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request to the addresses it carries."""

    def __init__(self, config: EgressConfig, context: ssl.SSLContext) -> None:
        self._config = config
        self._context = context
        self._pools: collections.OrderedDict[str, httpcore.AsyncConnectionPool] = (
            collections.OrderedDict()
        )
        self._in_flight: collections.Counter[str] = collections.Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        addresses = request.extensions.get(ADDRESSES)
        assert addresses, "an egress request carries its checked addresses"
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions={},
        )
        last: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                response = await self._send(address, core_request)
            except httpcore.ConnectError as exc:
                last = exc  # that address refused: try the next checked one
                continue
            return httpx.Response(
                status_code=response.status,
                headers=response.headers,
                stream=ReleasingStream(response, partial(self._done, address)),
                extensions={**response.extensions, ADDRESSES: address},
            )
        raise FetchError(f"cannot connect to {request.url.host}: {last}", kind="connect")

    async def _send(self, address: str, request: httpcore.Request) -> httpcore.Response:
        pool = await self._pool(address)
        self._in_flight[address] += 1
        try:
            return await pool.handle_async_request(request)
        except BaseException:
            self._done(address)
            raise

    def _done(self, address: str) -> None:
        self._in_flight[address] -= 1
        if not self._in_flight[address]:
            del self._in_flight[address]

    async def _pool(self, address: str) -> httpcore.AsyncConnectionPool:
        pool = self._pools.get(address)
        if pool is not None:
            self._pools.move_to_end(address)
            return pool
        if len(self._pools) >= self._config.pools_max:
            idle = next((a for a in self._pools if a not in self._in_flight), None)
            if idle is not None:
                await self._pools.pop(idle).aclose()
        pool = httpcore.AsyncConnectionPool(
            ssl_context=self._context,
            max_connections=self._config.connections_per_pool_max,
            max_keepalive_connections=self._config.connections_per_pool_max,
            keepalive_expiry=KEEPALIVE_SECONDS,
            network_backend=_PinnedBackend(address),
        )
        self._pools[address] = pool
        return pool

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), collections.OrderedDict()
        for pool in pools:
            await pool.aclose()


@final
class ReleasingStream(httpx.AsyncByteStream):
    """The response body; releases the address's in-flight count when closed."""

    def __init__(self, response: httpcore.Response, release: Callable[[], None]) -> None:
        self._response = response
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._response.aiter_stream():
            yield part

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            if self._release is not None:
                release, self._release = self._release, None
                release()
