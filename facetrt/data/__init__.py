"""Operators' data operations: list, export/import, delete, clone, rebind, backup/restore."""

from __future__ import annotations

from ._operations import DataOperations as DataOperations

__all__ = ["DataOperations"]
