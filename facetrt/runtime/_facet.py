"""The Facet API: the base class agent developers subclass, and the ``@rpc`` decorator."""

from __future__ import annotations

import inspect
import json as json_module
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from .._errors import BadRequestError
from .._fetch import FetchRequest, FetchResponse

if TYPE_CHECKING:
    from .._ids import FacetAddress
    from .._values import Value
    from ._storage_api import Storage
    from ._timers_api import Timers

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_RPC_MARK = "__facetrt_rpc__"


def rpc(method: F) -> F:
    """Mark an ``async def`` method of a :class:`Facet` as callable from outside.

    Raises:
        TypeError: ``method`` is not an ``async def`` function.
    """
    is_async = inspect.iscoroutinefunction(method)
    if not is_async:
        raise TypeError(f"@rpc needs an async def method, got {method!r}")
    setattr(method, _RPC_MARK, True)
    return method


class _Outbound(Protocol):
    async def call_facet(
        self,
        agent_id: str,
        method: str,
        args: tuple[Value, ...],
        kwargs: dict[str, Value],
        *,
        cls: str | None,
        idempotency_key: str | None,
    ) -> Value: ...

    async def fetch(self, request: FetchRequest) -> FetchResponse: ...


class EgressGateway(Protocol):
    """What performs ``self.fetch`` for a runtime (``facetrt.policy.Egress``)."""

    async def fetch(
        self, request: FetchRequest, *, tenant: str, agent: str, run_id: str
    ) -> FetchResponse: ...


class FacetCalls:
    """``self.facets``: calls from a facet to other facets of the same tenant."""

    __slots__ = ("_outbound",)

    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def call(
        self,
        agent_id: str,
        method: str,
        /,
        *args: Value,
        cls: str | None = None,
        idempotency_key: str | None = None,
        **kwargs: Value,
    ) -> Value:
        """Call ``method`` of facet ``agent_id`` in this facet's tenant and return its result.

        Before the call leaves, this facet's earlier messages' writes are made durable (the
        output gate). The current message's own writes commit when it ends, as always.

        Raises:
            ReentrancyError: the target is on this call chain (waiting would deadlock).
            FacetrtError: any error of the callee, with its code.
        """
        return await self._outbound.call_facet(
            agent_id, method, args, kwargs, cls=cls, idempotency_key=idempotency_key
        )


class Facet:
    """Base class of facets: durable single-threaded actors addressed by ``(tenant, agent)``.

    Subclasses define ``@rpc`` methods; each runs as one message, to completion, with no other
    message of the facet interleaved, and all of its ``self.storage`` writes commit atomically
    before its reply is released. ``__init__`` (no arguments) may build in-memory state; the
    runtime sets ``storage``, ``timers``, ``facets`` and the address before calling it.

    A facet that uses ``self.timers`` defines
    ``async def on_timer(self, name: str, payload: Value, attempt: int) -> None``: it runs as a
    message of its own when a timer is due (``attempt`` is 1, then 2, ... on retries); if it
    raises, its writes are discarded and it is retried after 2, 4, 8, ... seconds, at most
    ``timer_retries_max`` times, after which the timer is kept as failed.
    """

    rpc_methods: ClassVar[frozenset[str]] = frozenset()

    storage: Storage
    timers: Timers
    facets: FacetCalls
    _address: FacetAddress
    _outbound: _Outbound

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = set()
        for klass in reversed(cls.__mro__):
            for name, attribute in vars(klass).items():
                if getattr(attribute, _RPC_MARK, False):
                    names.add(name)
                elif name in names:
                    names.discard(name)  # overridden without @rpc: no longer callable
        cls.rpc_methods = frozenset(names)

    @property
    def address(self) -> FacetAddress:
        return self._address

    @property
    def tenant(self) -> str:
        return self._address.tenant_id

    @property
    def agent_id(self) -> str:
        return self._address.agent_id

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        json: object = None,
    ) -> FetchResponse:
        """Make an outbound HTTP request under the tenant's egress policy (SPEC §6).

        Before it leaves, this facet's earlier messages' writes are made durable (the output
        gate) and the attempt is written to the tenant's durable audit log. Every redirect hop
        is decided again. A header value may hold ``{{secret:NAME}}``: the egress layer puts
        the secret's value there if the host is one the secret is bound to; facet code never
        sees the value (it is redacted from the response).

        Args:
            url: an ``http://`` or ``https://`` URL.
            method: the HTTP method.
            headers: request headers (``Host``, framing and proxy headers are refused).
            body: the request body (a str is sent as UTF-8).
            json: a JSON value to send as the body (``Content-Type: application/json``);
                not together with ``body``.

        Returns:
            The final response: ``status``, ``headers``, ``body``, ``url``, ``.text``, ``.json()``.

        Raises:
            PolicyViolationError: the policy denied the request or a redirect hop (the message
                names the deciding rule), or it went over the time or response-size limit.
            FetchError: an allowed request failed on the network (DNS, connect, TLS, HTTP).
            BadRequestError: malformed arguments.
            InternalError: the audit log could not be written; nothing was sent (retryable).
        """
        request = build_request(url, method=method, headers=headers, body=body, json=json)
        return await self._outbound.fetch(request)

    async def on_activate(self) -> None:
        """Called once per activation before its first message; may read and write storage."""

    async def on_deactivate(self) -> None:
        """Called before passivation; best-effort and cut short after ``deactivate_seconds_max``."""


def instantiate(
    cls: type[Facet],
    *,
    address: FacetAddress,
    storage: Storage,
    timers: Timers,
    outbound: _Outbound,
) -> Facet:
    """Create a facet instance with its runtime attributes set before ``__init__`` runs."""
    facet = cls.__new__(cls)
    facet._address = address
    facet.storage = storage
    facet.timers = timers
    facet.facets = FacetCalls(outbound)
    facet._outbound = outbound
    facet.__init__()  # type: ignore[misc]  # deliberate: attributes are set before __init__
    return facet


def build_request(
    url: str,
    *,
    method: str,
    headers: Mapping[str, str] | None,
    body: bytes | str | None,
    json: object,
) -> FetchRequest:
    """Check and normalise ``fetch``'s arguments.

    Raises:
        BadRequestError: wrong types, or both ``body`` and ``json``.
    """
    if not isinstance(url, str) or not isinstance(method, str) or not method:
        raise BadRequestError("fetch needs a str url and a non-empty str method")
    pairs: list[tuple[str, str]] = []
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise BadRequestError("fetch headers must map str to str")
        pairs.append((name, value))
    if json is not None:
        if body is not None:
            raise BadRequestError("fetch takes body or json, not both")
        try:
            body = json_module.dumps(json, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BadRequestError(f"fetch json= is not JSON-serialisable: {exc}") from None
        if not any(name.lower() == "content-type" for name, _ in pairs):
            pairs.append(("Content-Type", "application/json"))
    if isinstance(body, str):
        body = body.encode()
    elif body is not None and not isinstance(body, bytes):
        raise BadRequestError("fetch body must be bytes or str")
    return FetchRequest(url=url, method=method.upper(), headers=tuple(pairs), body=body)
