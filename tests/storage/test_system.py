"""The system store's key rules that must hold inside one write transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from facetrt import ConflictError, NotFoundError
from facetrt.storage import SystemStore

if TYPE_CHECKING:
    from pathlib import Path


def test_keep_an_admin_key_refuses_only_the_last_active_admin_key(tmp_path: Path) -> None:
    system = SystemStore(tmp_path / "system")
    try:
        system.create_tenant("acme")
        tenant_key, _ = system.create_key("acme")
        first, _ = system.create_key(None)
        second, _ = system.create_key(None)
        system.revoke_key(first, keep_an_admin_key=True)
        with pytest.raises(ConflictError):
            system.revoke_key(second, keep_an_admin_key=True)
        assert [r.key_id for r in system.list_keys() if r.is_admin and r.revoked is None] == [
            second
        ]
        system.revoke_key(tenant_key, keep_an_admin_key=True)  # tenant keys: no such rule
        with pytest.raises(NotFoundError):
            system.revoke_key(first, keep_an_admin_key=True)
        system.revoke_key(second)  # the offline CLI may (the operator holds the data dir)
    finally:
        system.close()
