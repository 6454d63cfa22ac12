"""The Facet API: the base class agent developers subclass, and the ``@rpc`` decorator."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

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
    facet.__init__()  # type: ignore[misc]  # deliberate: attributes are set before __init__
    return facet
