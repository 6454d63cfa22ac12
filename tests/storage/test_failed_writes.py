"""Failed writes of the node's own environments: the system store and the timer index.

A failed meta page write (``tests.faults.meta_write``: a real descriptor that refuses writes)
is the failure after which LMDB refuses every later transaction of the environment, reads
included. Each store must answer it with a StorageError, keep nothing of the failed write,
and serve the next call by opening its environment again, without a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from facetrt import FacetAddress, StorageError
from facetrt.storage import SystemStore, TimerIndex
from tests.faults.meta_write import failing_meta_writes

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

A = FacetAddress("acme", "a")
B = FacetAddress("acme", "b")


@pytest.fixture
def system(tmp_path: Path) -> Iterator[SystemStore]:
    opened = SystemStore(tmp_path / "system")
    yield opened
    opened.close()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[TimerIndex]:
    opened = TimerIndex(tmp_path / "timers", map_size_bytes=1 << 20, readers_max=4)
    yield opened
    opened.close()


def test_system_store_write_failure_keeps_nothing_and_the_next_write_works(
    system: SystemStore,
) -> None:
    _, key = system.create_tenant_with_key("before")
    with failing_meta_writes(system.path):
        with pytest.raises(StorageError, match="system store write failed"):
            system.create_tenant_with_key("failed")
        # Reopened at once: reads and writes work again, and the failed write is not there.
        assert system.list_tenants() == ["before"]
        assert [record.tenant for record in system.list_keys()] == ["before"]
        system.create_tenant("after")
    assert system.list_tenants() == ["after", "before"]
    assert system.authenticate(key).tenant == "before"  # active keys survive the reopen


def test_system_store_failed_revocation_leaves_the_key_valid(system: SystemStore) -> None:
    key_id, key = system.create_tenant_with_key("acme")
    with failing_meta_writes(system.path), pytest.raises(StorageError):
        system.revoke_key(key_id)
    assert system.authenticate(key).key_id == key_id
    system.revoke_key(key_id)
    assert [record.revoked is not None for record in system.list_keys()] == [True]


def test_tenant_and_its_first_key_commit_together(system: SystemStore) -> None:
    """A failed create leaves neither, so retrying the create succeeds (not ``conflict``)."""
    with failing_meta_writes(system.path), pytest.raises(StorageError):
        system.create_tenant_with_key("acme")
    assert system.list_tenants() == []
    assert system.list_keys() == []
    _, key = system.create_tenant_with_key("acme")
    assert system.authenticate(key).tenant == "acme"


def test_timer_index_write_failure_keeps_the_old_hint_and_the_next_write_works(
    index: TimerIndex,
) -> None:
    index.lower(A, 5_000)
    with failing_meta_writes(index.path):
        with pytest.raises(StorageError, match="timer index commit failed"):
            index.lower(A, 3_000)
        assert index.hint_of(A) == 5_000
        assert index.lower(B, 4_000) == 4_000
    assert index.due(10_000, skip=(), limit=10) == ([B, A], None)
    assert index.count() == 2


def test_timer_index_repair_reopens_an_environment_that_refuses_reads(
    index: TimerIndex,
) -> None:
    index.lower(A, 5_000)
    index.close()  # what a fatal LMDB error looks like to readers: every read fails
    with pytest.raises(StorageError, match="timer index read failed"):
        index.due(10_000, skip=(), limit=10)
    index.repair()
    assert index.due(10_000, skip=(), limit=10) == ([A], None)
