"""The admin key file survives a crash at any point of its creation.

A crash is reproduced by the state it leaves on disk, in a real system store (LMDB) and real
files: either built by hand (what each point of the write leaves), or left by the real write
interrupted by an exception where a kill would stop it (nothing after that point runs, and the
write has no cleanup that would hide the difference). The next start (``ensure_admin_key``) or
restore (``refresh_admin_key``) must leave an ``admin.key`` that authenticates as an active
admin key, and must never install a key that the store does not hold.
"""

from __future__ import annotations

import logging
import stat
from typing import TYPE_CHECKING

import pytest

from facetrt import StorageError, UnauthorizedError
from facetrt.server._admin_key import ensure_admin_key, refresh_admin_key, rotate_admin_key
from facetrt.storage import NewKey, SystemStore

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class Crash(Exception):
    """Stands for the process dying at this point."""


class CrashingStore(SystemStore):
    """A real system store whose ``store_key`` dies before or after its durable commit."""

    def __init__(self, path: Path, *, after_commit: bool) -> None:
        super().__init__(path)
        self.after_commit = after_commit

    def store_key(self, new: NewKey) -> None:
        if self.after_commit:
            super().store_key(new)
        raise Crash


class CrashingRotation(SystemStore):
    """A real system store on which a rotation dies at ``point``: in ``store_key`` before or
    after its durable commit, or at the revocation of the old keys (before its commit)."""

    def __init__(self, path: Path, *, point: str) -> None:
        super().__init__(path)
        self.point = point

    def store_key(self, new: NewKey) -> None:
        if self.point == "before-store":
            raise Crash
        super().store_key(new)
        if self.point == "after-store":
            raise Crash

    def revoke_other_admin_keys(self, keep: str) -> list[str]:
        assert self.point == "before-revoke"
        raise Crash


@pytest.fixture
def system(tmp_path: Path) -> Iterator[SystemStore]:
    opened = SystemStore(tmp_path / "system")
    yield opened
    opened.close()


def key_file(tmp_path: Path) -> Path:
    return tmp_path / "admin.key"


def temporary_file(tmp_path: Path) -> Path:
    return tmp_path / "admin.key.tmp"


def leave(path: Path, key: str, mode: int = 0o600) -> None:
    """Write ``key`` as the admin key write does (one line)."""
    path.write_text(key + "\n")
    path.chmod(mode)


def stored_admin_key(system: SystemStore) -> str:
    """A new admin key whose hash is stored (what step 3 of the write commits)."""
    new = system.new_key(None)
    system.store_key(new)
    return new.key


def admin_key_ids(system: SystemStore) -> list[str]:
    return [r.key_id for r in system.list_keys() if r.is_admin and r.revoked is None]


def assert_working_admin_key(system: SystemStore, path: Path) -> str:
    key = path.read_text().strip()
    assert system.authenticate(key).is_admin
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not temporary_file(path.parent).exists()
    return key


def assert_not_valid(system: SystemStore, key: str) -> None:
    with pytest.raises(UnauthorizedError):
        system.authenticate(key)


def test_first_start_writes_a_working_admin_key_and_no_temporary_file(
    tmp_path: Path, system: SystemStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = ensure_admin_key(system, tmp_path)
    key = assert_working_admin_key(system, path)
    assert key not in caplog.text
    assert ensure_admin_key(system, tmp_path) == path  # a second start keeps it
    assert path.read_text().strip() == key
    assert len(admin_key_ids(system)) == 1


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-store", "after-store"])
def test_a_write_interrupted_around_the_store_commit_leaves_a_recoverable_state(
    tmp_path: Path, after_commit: bool
) -> None:
    """Goal: the real write's order leaves, at the two points around the store's commit, a
    state the next start repairs. Method: the first start's ``store_key`` dies before or
    after committing; the store is reopened (its commit is all that survives of it) and the
    node starts again."""
    crashing = CrashingStore(tmp_path / "system", after_commit=after_commit)
    try:
        with pytest.raises(Crash):
            ensure_admin_key(crashing, tmp_path)
    finally:
        crashing.close()
    assert not key_file(tmp_path).exists()
    left = temporary_file(tmp_path).read_text().strip()  # the key is on disk before its hash
    system = SystemStore(tmp_path / "system")
    try:
        assert len(admin_key_ids(system)) == (1 if after_commit else 0)
        key = assert_working_admin_key(system, ensure_admin_key(system, tmp_path))
        assert (key == left) is after_commit  # the stored key is kept, an unstored one is not
        assert len(admin_key_ids(system)) == 1
    finally:
        system.close()


def test_key_stored_but_only_in_the_temporary_file_is_moved_into_place(
    tmp_path: Path, system: SystemStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Crash after the hash is stored and before the rename (or a rename lost with the
    unsynced directory): hash stored, the key only in ``admin.key.tmp``, no ``admin.key``.
    The temporary file is left 0644 to check that the installed file is 0600 anyway."""
    caplog.set_level(logging.DEBUG)
    key = stored_admin_key(system)
    leave(temporary_file(tmp_path), key, mode=0o644)
    assert assert_working_admin_key(system, ensure_admin_key(system, tmp_path)) == key
    assert len(admin_key_ids(system)) == 1  # recovered, not replaced by a second key
    assert key not in caplog.text


def test_key_stored_but_only_in_the_older_temporary_name_is_moved_into_place(
    tmp_path: Path, system: SystemStore
) -> None:
    """The write before this order stored the hash first and used ``admin.tmp``: a crash
    between its fsync and rename left the only copy of a stored key there."""
    key = stored_admin_key(system)
    leave(tmp_path / "admin.tmp", key)
    assert assert_working_admin_key(system, ensure_admin_key(system, tmp_path)) == key
    assert not (tmp_path / "admin.tmp").exists()


def test_stale_admin_key_file_is_replaced_by_the_stored_key_of_the_temporary_file(
    tmp_path: Path, system: SystemStore
) -> None:
    """A restore's rewrite (``refresh_admin_key``) interrupted after storing its key:
    ``admin.key`` still holds the replaced store's key, the new one is in the temporary file.
    The next start installs it (before, it kept the stale file: no working admin key)."""
    stored_admin_key(system)  # the restored store's own admin key, which no file holds
    key = stored_admin_key(system)
    leave(key_file(tmp_path), system.new_key(None).key)  # a key this store does not hold
    leave(temporary_file(tmp_path), key)
    assert assert_working_admin_key(system, ensure_admin_key(system, tmp_path)) == key


def test_stray_temporary_file_with_an_unknown_key_never_becomes_the_admin_key(
    tmp_path: Path, system: SystemStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Crash after the temporary file is written and before the hash is stored: its key is
    valid nowhere. On a first start it is overwritten; with an admin key stored and in place
    it is removed; with the stored admin key's file lost it is not installed either."""
    stray = system.new_key(None).key
    leave(temporary_file(tmp_path), stray)
    first = assert_working_admin_key(system, ensure_admin_key(system, tmp_path))
    assert first != stray
    assert_not_valid(system, stray)

    leave(temporary_file(tmp_path), stray)
    assert assert_working_admin_key(system, ensure_admin_key(system, tmp_path)) == first

    key_file(tmp_path).unlink()  # lost by hand: the stored key is in no file
    leave(temporary_file(tmp_path), stray)
    with caplog.at_level(logging.WARNING):
        ensure_admin_key(system, tmp_path)
    assert "missing or holds no active admin key" in caplog.text
    assert not key_file(tmp_path).exists()
    assert not temporary_file(tmp_path).exists()
    assert_not_valid(system, stray)
    assert len(admin_key_ids(system)) == 1


def test_temporary_file_holding_a_tenant_key_is_not_installed(
    tmp_path: Path, system: SystemStore
) -> None:
    stored_admin_key(system)
    system.create_tenant("acme")
    _, tenant_key = system.create_key("acme")
    leave(temporary_file(tmp_path), tenant_key)
    ensure_admin_key(system, tmp_path)
    assert not key_file(tmp_path).exists()


def test_first_start_does_not_write_through_a_link_planted_as_the_temporary_file(
    tmp_path: Path, system: SystemStore
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    temporary_file(tmp_path).symlink_to(victim)
    assert_working_admin_key(system, ensure_admin_key(system, tmp_path))
    assert victim.read_text() == "untouched\n"


def test_refresh_installs_the_stored_key_of_an_interrupted_refresh(
    tmp_path: Path, system: SystemStore
) -> None:
    """``restore --system``'s refresh died after storing its new key: running it again (or
    the next start, above) installs that key instead of creating yet another one."""
    path = key_file(tmp_path)
    leave(path, system.new_key(None).key)  # the replaced store's key
    key = stored_admin_key(system)
    leave(temporary_file(tmp_path), key)
    assert refresh_admin_key(system, path) is True
    assert assert_working_admin_key(system, path) == key
    assert len(admin_key_ids(system)) == 1
    assert refresh_admin_key(system, path) is False  # now valid: nothing to do


def test_refresh_writes_a_new_key_over_a_stray_temporary_file(
    tmp_path: Path, system: SystemStore
) -> None:
    path = key_file(tmp_path)
    old = system.new_key(None).key
    leave(path, old)
    stray = system.new_key(None).key
    leave(temporary_file(tmp_path), stray)
    assert refresh_admin_key(system, path) is True
    key = assert_working_admin_key(system, path)
    assert key not in (old, stray)
    assert_not_valid(system, stray)


def test_refresh_of_a_custom_key_file_uses_a_temporary_file_next_to_it(
    tmp_path: Path, system: SystemStore
) -> None:
    """``--admin-key-file`` may name any file: the temporary file is ``<name>.tmp``, never a
    sibling sharing its stem (``with_suffix``), which could be someone else's file."""
    path = tmp_path / "keys" / "admin.txt"
    path.parent.mkdir()
    neighbour = tmp_path / "keys" / "admin.tmp"
    neighbour.write_text("not ours\n")
    assert refresh_admin_key(system, path) is True
    assert system.authenticate(path.read_text().strip()).is_admin
    assert neighbour.read_text() == "not ours\n"
    assert not (tmp_path / "keys" / "admin.txt.tmp").exists()


def test_rotation_writes_a_new_key_then_revokes_every_other_admin_key(
    tmp_path: Path, system: SystemStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = ensure_admin_key(system, tmp_path)
    old = path.read_text().strip()
    extra = stored_admin_key(system)  # e.g. left valid by an interrupted earlier rotation
    system.create_tenant("acme")
    _, tenant_key = system.create_key("acme")
    rotation = rotate_admin_key(system, path)
    key = assert_working_admin_key(system, path)
    assert rotation.path == path
    assert admin_key_ids(system) == [rotation.key_id]
    assert sorted(rotation.revoked_key_ids) == sorted(
        k.removeprefix("frt_").partition("_")[0] for k in (old, extra)
    )
    assert_not_valid(system, old)
    assert_not_valid(system, extra)
    assert system.authenticate(tenant_key).tenant == "acme"  # tenant keys are untouched
    assert key not in caplog.text
    assert key not in repr(rotation)


@pytest.mark.parametrize("point", ["before-store", "after-store", "before-revoke"])
def test_a_rotation_interrupted_anywhere_leaves_a_working_admin_key_file(
    tmp_path: Path, point: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Goal: the old key is revoked only once the new one is stored and in the file, and
    each interrupted state is repaired by the next start, then finished by running the
    rotation again. Method: a real rotation dies at ``point``; the store is reopened (its
    commits are all that survive) and the node starts again.

    before-store: the new key is valid nowhere: the old file and key stay, alone.
    after-store: the new key is stored but still in the temporary file: the start moves it
    into place (over the old, still valid key, and says so): two valid admin keys.
    before-revoke: the new key is in the file and stored: two valid admin keys."""
    first = SystemStore(tmp_path / "system")
    try:
        old = ensure_admin_key(first, tmp_path).read_text().strip()
    finally:
        first.close()
    crashing = CrashingRotation(tmp_path / "system", point=point)
    try:
        with pytest.raises(Crash):
            rotate_admin_key(crashing, key_file(tmp_path))
    finally:
        crashing.close()
    system = SystemStore(tmp_path / "system")
    try:
        with caplog.at_level(logging.WARNING):
            key = assert_working_admin_key(system, ensure_admin_key(system, tmp_path))
        assert system.authenticate(old).is_admin  # never revoked before the new key is in place
        assert (key == old) is (point == "before-store")
        assert len(admin_key_ids(system)) == (1 if point == "before-store" else 2)
        assert ("rotate-admin" in caplog.text) is (point == "after-store")
        rotation = rotate_admin_key(system, key_file(tmp_path))  # the operator runs it again
        assert admin_key_ids(system) == [rotation.key_id]
        assert_not_valid(system, old)
        assert_not_valid(system, key)  # the old key, or the first rotation's
    finally:
        system.close()


def test_a_rotation_that_cannot_write_the_file_revokes_nothing(
    tmp_path: Path, system: SystemStore
) -> None:
    path = ensure_admin_key(system, tmp_path)
    old = path.read_text().strip()
    with pytest.raises(StorageError, match="cannot write the admin key file"):
        rotate_admin_key(system, tmp_path / "missing" / "admin.key")
    assert system.authenticate(old).is_admin
    assert len(admin_key_ids(system)) == 1
