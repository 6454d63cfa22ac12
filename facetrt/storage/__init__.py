"""Synchronous LMDB storage: one environment per facet. No trio here."""

from __future__ import annotations

from ._registry import DataDirLock as DataDirLock
from ._registry import FacetRecord as FacetRecord
from ._registry import StoreRegistry as StoreRegistry
from ._registry import count_tenant_facets as count_tenant_facets
from ._registry import tenant_path as tenant_path
from ._store import DATA_DB as DATA_DB
from ._store import IDEM_DB as IDEM_DB
from ._store import KEY_BYTES_MAX as KEY_BYTES_MAX
from ._store import META_DB as META_DB
from ._store import TIMERS_DB as TIMERS_DB
from ._store import CommitBatch as CommitBatch
from ._store import FacetStore as FacetStore
from ._store import StoreHooks as StoreHooks
from ._store import fsync_dir as fsync_dir
from ._store import open_environment as open_environment
from ._store import write_private_file as write_private_file
from ._system import KeyRecord as KeyRecord
from ._system import NewKey as NewKey
from ._system import Principal as Principal
from ._system import SystemStore as SystemStore
from ._timer_index import TimerIndex as TimerIndex

__all__ = [
    "DATA_DB",
    "IDEM_DB",
    "KEY_BYTES_MAX",
    "META_DB",
    "TIMERS_DB",
    "CommitBatch",
    "DataDirLock",
    "FacetRecord",
    "FacetStore",
    "KeyRecord",
    "NewKey",
    "Principal",
    "StoreHooks",
    "StoreRegistry",
    "SystemStore",
    "TimerIndex",
    "count_tenant_facets",
    "fsync_dir",
    "open_environment",
    "tenant_path",
    "write_private_file",
]
