"""Operators' data operations: list, export/import, delete, clone, rebind, backup/restore."""

from __future__ import annotations

from ._operations import DataOperations as DataOperations
from ._tenants import refuse_leftover_tenant_data as refuse_leftover_tenant_data

__all__ = ["DataOperations", "refuse_leftover_tenant_data"]
