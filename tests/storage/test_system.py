"""The system store's key rules that must hold inside one write transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from facetrt import ConflictError, NotFoundError, UnauthorizedError
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


def test_a_new_key_authenticates_only_once_stored_and_only_once(tmp_path: Path) -> None:
    """The daemon makes an admin key durable in its file before storing the hash
    (``new_key`` then ``store_key``); storing one twice would reset a revocation."""
    system = SystemStore(tmp_path / "system")
    try:
        new = system.new_key(None)
        assert new.key not in repr(new)
        with pytest.raises(UnauthorizedError):
            system.authenticate(new.key)
        system.store_key(new)
        assert system.authenticate(new.key).is_admin
        system.revoke_key(new.key_id)
        with pytest.raises(ConflictError):
            system.store_key(new)
        with pytest.raises(UnauthorizedError):
            system.authenticate(new.key)
        with pytest.raises(NotFoundError):
            system.store_key(system.new_key("nobody"))
    finally:
        system.close()
    reopened = SystemStore(tmp_path / "system")
    try:
        assert [(r.key_id, r.revoked is not None) for r in reopened.list_keys()] == [
            (new.key_id, True)
        ]
    finally:
        reopened.close()


def test_revoke_other_admin_keys_keeps_one_active_admin_key(tmp_path: Path) -> None:
    """A rotation's last step: every active admin key but the new one is revoked in one
    commit; a ``keep`` that is not an active admin key revokes nothing."""
    system = SystemStore(tmp_path / "system")
    try:
        system.create_tenant("acme")
        tenant_key, _ = system.create_key("acme")
        old, old_key = system.create_key(None)
        revoked, _ = system.create_key(None)
        system.revoke_key(revoked)
        new, new_key = system.create_key(None)
        for keep in (tenant_key, revoked, "0123456789abcdef"):
            with pytest.raises(NotFoundError):
                system.revoke_other_admin_keys(keep)
        assert system.authenticate(old_key).is_admin
        assert system.revoke_other_admin_keys(new) == [old]
        with pytest.raises(UnauthorizedError):
            system.authenticate(old_key)  # at once, through this object
        assert system.authenticate(new_key).is_admin
        assert system.revoke_other_admin_keys(new) == []
    finally:
        system.close()
    reopened = SystemStore(tmp_path / "system")
    try:
        active = {r.key_id for r in reopened.list_keys() if r.revoked is None}
        assert active == {tenant_key, new}
    finally:
        reopened.close()
