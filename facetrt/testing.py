"""Public helpers for testing facets: fault and delay injection into the storage layer."""

from __future__ import annotations

from .storage import StoreHooks as StoreHooks

__all__ = ["StoreHooks"]
