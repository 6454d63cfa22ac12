"""facetrt: durable single-threaded actors (facets) on LMDB, for multi-tenant agent data planes.

Write a facet::

    from facetrt import Facet, rpc

    class Counter(Facet):
        @rpc
        async def increment(self, by: int = 1) -> int:
            value = self.storage.get("count", 0) + by
            self.storage.put("count", value)
            return value

and host it in-process::

    async with facetrt.open_runtime("./data", classes={"Counter": Counter}) as rt:
        await rt.call("acme", "counter-1", "increment", cls="Counter")
"""

from __future__ import annotations

from ._errors import ActorDeadError as ActorDeadError
from ._errors import AddressError as AddressError
from ._errors import BadRequestError as BadRequestError
from ._errors import ConfigError as ConfigError
from ._errors import ConflictError as ConflictError
from ._errors import DeadlineExceededError as DeadlineExceededError
from ._errors import ErrorCode as ErrorCode
from ._errors import FacetrtError as FacetrtError
from ._errors import ForbiddenError as ForbiddenError
from ._errors import HandlerError as HandlerError
from ._errors import InternalError as InternalError
from ._errors import NotFoundError as NotFoundError
from ._errors import OverloadedError as OverloadedError
from ._errors import PolicyViolationError as PolicyViolationError
from ._errors import QuotaExceededError as QuotaExceededError
from ._errors import ReentrancyError as ReentrancyError
from ._errors import StorageError as StorageError
from ._errors import StoreFullError as StoreFullError
from ._errors import UnauthorizedError as UnauthorizedError
from ._errors import UnavailableError as UnavailableError
from ._fetch import FetchError as FetchError
from ._fetch import FetchRequest as FetchRequest
from ._fetch import FetchResponse as FetchResponse
from ._ids import FacetAddress as FacetAddress
from ._values import Value as Value
from .config import RuntimeConfig as RuntimeConfig
from .config import TenantQuotaSettings as TenantQuotaSettings
from .runtime import Facet as Facet
from .runtime import FacetCalls as FacetCalls
from .runtime import Runtime as Runtime
from .runtime import RuntimeStatistics as RuntimeStatistics
from .runtime import Saturation as Saturation
from .runtime import Storage as Storage
from .runtime import TenantQuotas as TenantQuotas
from .runtime import Timer as Timer
from .runtime import Timers as Timers
from .runtime import open_runtime as open_runtime
from .runtime import rpc as rpc

__all__ = [
    "ActorDeadError",
    "AddressError",
    "BadRequestError",
    "ConfigError",
    "ConflictError",
    "DeadlineExceededError",
    "ErrorCode",
    "Facet",
    "FacetAddress",
    "FacetCalls",
    "FacetrtError",
    "FetchError",
    "FetchRequest",
    "FetchResponse",
    "ForbiddenError",
    "HandlerError",
    "InternalError",
    "NotFoundError",
    "OverloadedError",
    "PolicyViolationError",
    "QuotaExceededError",
    "ReentrancyError",
    "Runtime",
    "RuntimeConfig",
    "RuntimeStatistics",
    "Saturation",
    "Storage",
    "StorageError",
    "StoreFullError",
    "TenantQuotaSettings",
    "TenantQuotas",
    "Timer",
    "Timers",
    "UnauthorizedError",
    "UnavailableError",
    "Value",
    "open_runtime",
    "rpc",
]
