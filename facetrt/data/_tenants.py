"""Tenant names are reused only over a clean slate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import ConflictError

if TYPE_CHECKING:
    from pathlib import Path


def refuse_leftover_tenant_data(root: Path, tenant: str) -> None:
    """Refuse to create ``tenant`` while facets of an earlier tenant of that name remain.

    A tenant delete that did not finish (a crash, or calls that re-created a facet while it
    ran) leaves the hashed tenant directory behind; a new tenant of the same name would
    otherwise see that data. Deleting the tenant again finishes the wipe.

    Raises:
        ConflictError: ``root`` (the tenant's directory) still exists.
    """
    if root.exists():
        raise ConflictError(
            f"data of an earlier tenant {tenant!r} is still on disk; run "
            f"`facetrt tenant delete {tenant}` to finish wiping it, then create the tenant"
        )
