"""trio actors hosting facets; knows storage, never the wire."""

from __future__ import annotations

from ._facet import EgressGateway as EgressGateway
from ._facet import Facet as Facet
from ._facet import FacetCalls as FacetCalls
from ._facet import rpc as rpc
from ._load import HistogramSnapshot as HistogramSnapshot
from ._quotas import InFlight as InFlight
from ._quotas import TenantQuotas as TenantQuotas
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._runtime import Saturation as Saturation
from ._runtime import open_runtime as open_runtime
from ._storage_api import Storage as Storage
from ._timers_api import Timer as Timer
from ._timers_api import Timers as Timers

__all__ = [
    "EgressGateway",
    "Facet",
    "FacetCalls",
    "HistogramSnapshot",
    "InFlight",
    "Runtime",
    "RuntimeStatistics",
    "Saturation",
    "Storage",
    "TenantQuotas",
    "Timer",
    "Timers",
    "open_runtime",
    "rpc",
]
