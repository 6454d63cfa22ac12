"""TimerIndex: the node-level timer hints (real LMDB in tmp_path)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pytest

from facetrt import FacetAddress, StorageError
from facetrt.storage import StoreHooks, TimerIndex

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

A = FacetAddress("acme", "a")
B = FacetAddress("acme", "b/with:odd.chars")
C = FacetAddress("other", "a")


@pytest.fixture
def index(tmp_path: Path) -> Iterator[TimerIndex]:
    opened = TimerIndex(tmp_path / "timers", map_size_bytes=1 << 20, readers_max=4)
    yield opened
    opened.close()


def test_lower_never_raises_a_hint(index: TimerIndex) -> None:
    assert index.lower(A, 5_000) == 5_000
    assert index.lower(A, 7_000) == 5_000
    assert index.lower(A, 3_000) == 3_000
    assert index.hint_of(A) == 3_000
    assert index.count() == 1


def test_settle_sets_or_removes_the_one_hint(index: TimerIndex) -> None:
    index.lower(A, 3_000)
    index.settle(A, 9_000)
    assert index.hint_of(A) == 9_000
    assert index.due(10_000, skip=(), limit=10) == ([A], None)
    index.settle(A, None)
    assert index.hint_of(A) is None
    assert index.due(10_000, skip=(), limit=10) == ([], None)
    assert index.count() == 0


def test_due_is_earliest_first_skips_and_stops_at_the_limit(index: TimerIndex) -> None:
    index.lower(C, 3_000)
    index.lower(B, 1_000)
    index.lower(A, 2_000)
    assert index.due(2_500, skip=(), limit=10) == ([B, A], 3_000)
    assert index.due(2_500, skip={B}, limit=10) == ([A], 3_000)
    assert index.due(5_000, skip=(), limit=2) == ([B, A], None)
    assert index.due(500, skip=(), limit=10) == ([], 1_000)


def test_due_after_resumes_after_its_position_and_wraps_around(index: TimerIndex) -> None:
    index.lower(C, 3_000)
    index.lower(B, 1_000)
    index.lower(A, 2_000)
    found, position, next_ms = index.due_after(5_000, after=None, skip=(), limit=2)
    assert (found, next_ms) == ([B, A], None)
    assert position is not None
    # The next scan starts after A: C first, then around to B (A is where it stopped).
    found, after_b, next_ms = index.due_after(5_000, after=position, skip=(), limit=2)
    assert (found, next_ms) == ([C, B], None)
    assert after_b is not None
    assert index.due_after(5_000, after=after_b, skip=(), limit=1) == ([A], position, None)
    # A scan that sees every due hint (its own position last) returns no position.
    assert index.due_after(5_000, after=position, skip=(), limit=10) == ([C, B, A], None, None)
    assert index.due_after(2_500, after=position, skip={B}, limit=10) == ([A], None, 3_000)
    assert index.due_after(500, after=position, skip=(), limit=10) == ([], None, 1_000)


def test_forget_if_missing_keeps_hints_of_existing_stores(
    index: TimerIndex, tmp_path: Path
) -> None:
    index.lower(A, 1_000)
    store = tmp_path / "store"
    store.mkdir()
    (store / "data.mdb").write_bytes(b"")
    assert index.forget_if_missing(A, store) is False
    assert index.hint_of(A) == 1_000
    assert index.forget_if_missing(A, tmp_path / "missing") is True
    assert index.hint_of(A) is None
    assert index.forget_if_missing(A, tmp_path / "missing") is False


def test_operations_from_many_threads_are_group_committed(index: TimerIndex) -> None:
    addresses = [FacetAddress("acme", f"f{number}") for number in range(64)]

    def work(address: FacetAddress, due: int) -> None:
        for step in range(5):
            index.lower(address, due + 10 * (5 - step))
        index.settle(address, due)

    threads = [
        threading.Thread(target=work, args=(address, 1_000 + number))
        for number, address in enumerate(addresses)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert index.count() == len(addresses)
    found, _ = index.due(10_000, skip=(), limit=1000)
    assert found == addresses  # by due time, which follows the numbering
    assert all(index.hint_of(address) == 1_000 + n for n, address in enumerate(addresses))


def test_an_index_commit_hook_that_raises_fails_the_batch_and_writes_nothing(
    tmp_path: Path,
) -> None:
    failing = False
    seen: list[Path] = []

    def hook(path: Path) -> None:
        seen.append(path)
        if failing:
            raise StorageError("injected index failure")

    hooks = StoreHooks(before_index_commit=hook)
    index = TimerIndex(tmp_path / "timers", map_size_bytes=1 << 20, readers_max=4, hooks=hooks)
    try:
        index.lower(A, 5_000)
        assert seen == [tmp_path / "timers"]
        failing = True
        with pytest.raises(StorageError, match="injected"):
            index.lower(A, 1_000)
        with pytest.raises(StorageError, match="injected"):
            index.settle(A, None)
        assert index.hint_of(A) == 5_000  # neither failed write changed anything
        failing = False
        index.settle(A, 7_000)  # and the index goes on
        assert index.hint_of(A) == 7_000
    finally:
        index.close()


def test_a_hook_raising_a_non_storage_error_does_not_report_success_for_batch_mates(
    tmp_path: Path,
) -> None:
    """StoreHooks promises: raising in before_index_commit fails every operation of that
    batch and writes nothing. With a RuntimeError (any injected fault that is not a
    StorageError), the group leader sees the error but the other operations of the same
    batch are marked done with their results (computed before the hook ran), so their
    callers believe a lower was made durable though the transaction was aborted."""
    first_entered = threading.Event()
    release_first = threading.Event()
    calls = 0

    def hook(path: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_entered.set()
            release_first.wait(5)
            return
        raise RuntimeError("injected")

    index = TimerIndex(
        tmp_path / "timers",
        map_size_bytes=1 << 20,
        readers_max=4,
        hooks=StoreHooks(before_index_commit=hook),
    )
    outcomes: dict[str, object] = {}

    def run(name: str, address: FacetAddress, due: int) -> None:
        try:
            outcomes[name] = index.lower(address, due)
        except BaseException as exc:  # noqa: BLE001
            outcomes[name] = exc

    try:
        leader = threading.Thread(target=run, args=("c", C, 9_000))
        leader.start()
        assert first_entered.wait(5)
        # Two operations queue while the first batch commits: the next batch holds both.
        others = [
            threading.Thread(target=run, args=("a", A, 1_000)),
            threading.Thread(target=run, args=("b", B, 2_000)),
        ]
        for thread in others:
            thread.start()
        deadline = time.monotonic() + 5
        while len(index._group.queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)  # until both wait behind the first batch (not a timing claim)
        assert len(index._group.queue) == 2
        release_first.set()
        for thread in [leader, *others]:
            thread.join(5)
        assert outcomes["c"] == 9_000
        # The batch [a, b] was aborted: nothing written.
        assert index.hint_of(A) is None
        assert index.hint_of(B) is None
        # ... so neither caller may see success.
        succeeded = [name for name in ("a", "b") if not isinstance(outcomes[name], BaseException)]
        assert succeeded == [], f"reported durable but not written: {succeeded} {outcomes}"
    finally:
        index.close()
