"""FacetStore and StoreRegistry on real LMDB files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import lmdb
import pytest

from facetrt import ConfigError, FacetAddress, StorageError, StoreFullError, open_runtime
from facetrt.storage import (
    IDEM_DB,
    META_DB,
    CommitBatch,
    DataDirLock,
    FacetStore,
    StoreRegistry,
)
from facetrt.storage import _store as store_module

if TYPE_CHECKING:
    from pathlib import Path

KIB = 1024


def _store(path: Path, initial: int = 64 * KIB, maximum: int = 1024 * KIB) -> FacetStore:
    return FacetStore(path, map_size_bytes=initial, map_size_bytes_max=maximum)


def test_commit_then_read_back_in_order(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    store.commit(CommitBatch(data={b"b": b"2", b"a": b"1", b"c": b"3"}))
    store.commit(CommitBatch(data={b"b": None}, system={(IDEM_DB, b"k"): b"r"}))
    assert store.get(b"a") == b"1"
    assert store.get(b"b") is None
    assert store.get_many([b"a", b"x", b"c"]) == [b"1", None, b"3"]
    assert store.get(b"k", IDEM_DB) == b"r"
    assert list(store.iterate(low=None, high=None, reverse=False)) == [(b"a", b"1"), (b"c", b"3")]
    assert list(store.iterate(low=b"b", high=None, reverse=True)) == [(b"c", b"3")]
    assert list(store.iterate(low=None, high=b"c", reverse=True)) == [(b"a", b"1")]
    assert store.count() == 2
    store.commit(CommitBatch(cleared=True, data={b"z": b"26"}))
    assert list(store.iterate(low=None, high=None, reverse=False)) == [(b"z", b"26")]
    assert store.get(b"k", IDEM_DB) == b"r"  # delete_all leaves system dbs alone
    store.close()


def test_data_survives_reopen_and_files_are_private(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    store.commit(CommitBatch(data={b"k": b"v"}))
    store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "data.mdb").st_mode) == 0o600
    store = _store(tmp_path / "s")
    assert store.get(b"k") == b"v"
    store.close()


def test_full_map_grows_until_the_maximum_then_refuses(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", initial=64 * KIB, maximum=128 * KIB)
    big = b"x" * (20 * KIB)
    store.commit(CommitBatch(data={b"a": big}))
    with pytest.raises(StoreFullError):
        store.commit(CommitBatch(data={b"b": big, b"c": big}))
    assert store.grow()
    assert store.map_size_bytes == 128 * KIB
    store.commit(CommitBatch(data={b"b": big}))
    assert not store.grow()
    with pytest.raises(StoreFullError):
        store.commit(CommitBatch(data={b"c": big, b"d": big, b"e": big}))
    assert store.get(b"c") is None
    store.close()
    # Reopening a store larger than the initial size keeps its size.
    store = _store(tmp_path / "s", initial=64 * KIB, maximum=128 * KIB)
    assert store.map_size_bytes >= 128 * KIB
    store.close()


def test_injected_commit_fault_writes_nothing(tmp_path: Path) -> None:
    from facetrt.testing import StoreHooks

    def fail(path: Path) -> None:
        raise OSError("disk on fire")

    store = FacetStore(
        tmp_path / "s",
        map_size_bytes=64 * KIB,
        map_size_bytes_max=64 * KIB,
        hooks=StoreHooks(before_commit=fail),
    )
    with pytest.raises(StorageError, match="disk on fire"):
        store.commit(CommitBatch(data={b"k": b"v"}))
    assert store.get(b"k") is None
    store.close()


def test_one_environment_is_never_opened_twice(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    with pytest.raises(StorageError, match="already open"):
        _store(tmp_path / "s")
    store.close()
    registry = StoreRegistry(tmp_path / "d", map_size_bytes=64 * KIB, map_size_bytes_max=64 * KIB)
    address = FacetAddress("t", "a")
    assert not registry.exists(address)
    opened = registry.open(address)
    with pytest.raises(AssertionError, match="opened twice"):
        registry.open(address)
    assert registry.open_count() == 1
    registry.close(opened)
    assert registry.exists(address)
    assert registry.open_count() == 0


def test_store_paths_are_hashes_of_the_ids(tmp_path: Path) -> None:
    registry = StoreRegistry(tmp_path, map_size_bytes=64 * KIB, map_size_bytes_max=64 * KIB)
    path = registry.path_of(FacetAddress("acme", "a/../../etc/passwd"))
    relative = path.relative_to(tmp_path.resolve())
    parts = relative.parts
    assert parts[0] == "tenants"
    assert parts[2] == "facets"
    assert all(part.isalnum() for part in parts)
    assert parts[3] == parts[4][:2]
    other_tenant = registry.path_of(FacetAddress("acme2", "a/../../etc/passwd"))
    assert other_tenant.parent.parent.parent != path.parent.parent.parent


def test_data_dir_lock_is_exclusive(tmp_path: Path) -> None:
    lock = DataDirLock(tmp_path)
    with pytest.raises(ConfigError, match="in use"):
        DataDirLock(tmp_path)
    lock.release()
    DataDirLock(tmp_path).release()


async def test_second_runtime_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    async with open_runtime(tmp_path, classes={}):
        with pytest.raises(ConfigError, match="in use"):
            async with open_runtime(tmp_path, classes={}):
                pass  # pragma: no cover - never reached


def test_lmdb_environment_options_are_durable(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    flags = store._env.flags()
    assert flags["sync"]
    assert flags["metasync"]
    assert not flags["writemap"]
    assert not flags["map_async"]
    store.close()
    with lmdb.open(str(tmp_path / "s"), max_dbs=4, lock=True) as env:
        assert env.stat()["entries"] >= 0


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories the store module fsyncs from now on, in order (the fsyncs still run)."""
    synced: list[Path] = []
    real = store_module.fsync_dir

    def recording(directory: Path) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(store_module, "fsync_dir", recording)
    return synced


def test_a_new_store_fsyncs_every_directory_up_to_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Goal: a new facet's first acknowledged commit cannot vanish with a parent directory
    that another open created (its fsync still running, or its process killed before it).
    Method: the second facet of a tenant finds the tenant's directories made; record the
    directories its creation fsyncs (the real fsyncs still run)."""
    registry = StoreRegistry(tmp_path, map_size_bytes=64 * KIB, map_size_bytes_max=64 * KIB)
    registry.close(registry.open(FacetAddress("acme", "first")))
    synced = record_fsyncs(monkeypatch)
    address = FacetAddress("acme", "second")
    registry.close(registry.open(address))
    path = registry.path_of(address)
    assert synced == [*reversed(path.parents[:5]), path]  # outermost first, the data dir too
    assert path.parents[4] == tmp_path.resolve()
    synced.clear()
    registry.close(registry.open(address))  # an existing store: nothing to make durable
    assert synced == []


def test_identify_names_open_stores_without_opening_them_again(tmp_path: Path) -> None:
    """A listing whose hint is unreadable asks the registry: an open store is named by the
    address it was opened with (LMDB refuses a second open in one process), a closed one by
    its meta db, and a store never committed (no ids) by nothing."""
    registry = StoreRegistry(tmp_path, map_size_bytes=64 * KIB, map_size_bytes_max=64 * KIB)
    address = FacetAddress("acme", "a")
    store = registry.open(address)
    path = registry.path_of(address)
    identity = registry.identify(path)
    assert identity is not None
    assert (identity.tenant, identity.agent) == ("acme", "a")
    registry.close(store)
    assert registry.identify(path) is None  # no ids committed yet
    store = registry.open(address)
    meta = {(META_DB, b"tenant"): b"\xa4acme", (META_DB, b"agent"): b"\xa1a"}
    store.commit(CommitBatch(system={**meta, (META_DB, b"class"): b"\xa3Reg"}))
    registry.close(store)
    identity = registry.identify(path)
    assert identity is not None
    assert (identity.tenant, identity.agent, identity.class_name) == ("acme", "a", "Reg")


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from facetrt import FacetAddress
    from facetrt.storage import StoreRegistry
    from facetrt.storage import _store

    def killed(*args, **kwargs):
        os._exit(9)  # SIGKILL-like: between LMDB's first commit and the directory fsyncs

    _store._sync_new_store = killed
    registry = StoreRegistry(Path(sys.argv[1]), map_size_bytes=65536, map_size_bytes_max=65536)
    registry.open(FacetAddress("acme", "a"))
    """
)


def test_a_creation_killed_before_its_fsyncs_is_made_durable_by_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a creation killed after LMDB's open wrote the data file's meta pages
    but before the directory fsyncs left a non-empty data.mdb, so the next open took the store
    for an existing one and fsynced nothing: its acknowledged commits depended on directory
    entries never made durable. The id hint, written once they are, now marks a finished
    creation. Method: a child process exits inside _sync_new_store; reopen and record."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], check=False, capture_output=True
    )
    assert child.returncode == 9, child.stderr.decode()
    address = FacetAddress("acme", "a")
    registry = StoreRegistry(tmp_path, map_size_bytes=64 * KIB, map_size_bytes_max=64 * KIB)
    path = registry.path_of(address)
    assert (path / "data.mdb").stat().st_size > 0  # what the next open sees

    synced = record_fsyncs(monkeypatch)
    store = registry.open(address)
    try:
        # the first acknowledged commit of this facet now depends on these entries
        assert path in synced, f"store directory never fsynced; synced={synced}"
        assert path.parent in synced
    finally:
        registry.close(store)
