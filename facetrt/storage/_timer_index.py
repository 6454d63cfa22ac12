"""TimerIndex: the node-level hint of when each facet next has a timer due.

The facet's own store holds its timers (the truth); this index only says *when to wake which
facet*, so that passivated facets need not stay open. It is a hint: it may name a facet that has
nothing due (a harmless spurious wake-up), but it must never be *later* than a facet's earliest
scheduled timer, or that timer would be lost until something else woke the facet.

Layout (``<data dir>/timers/``, one LMDB environment)::

    db due      8-byte big-endian due time (ms since the epoch) + facet key -> b""
    db facets   facet key -> 8-byte big-endian due time (ms): the facet's one hint

    facet key   tenant id (UTF-8) + b"\\x00" + agent id (UTF-8); neither id may hold a NUL

Invariant (both dbs change in one transaction, so they always agree): a facet has at most one
hint, and for every facet whose store holds a scheduled timer due at ``d``, the index holds a
hint ``h <= d``. The runtime keeps it with two operations and one ordering rule (see
``docs/decisions/0007-timers.md``): :meth:`lower` runs durably *before* the facet commit that
adds or advances a timer; :meth:`settle` (which may raise or remove a hint) runs only *after*
the facet commit it describes is durable. A crash between any two steps therefore leaves a hint
at or before every timer.

Writes come from the writer threads, one facet commit each; they are group-committed here
(one thread commits the operations every other thread queued meanwhile, with one fsync), so
the index costs one fsync per batch, not per timer. The queue is bounded by the number of
writer threads, each of which waits for its own operation. Reads run on the event loop.

Storage failures. A failed commit fails every operation of its batch (:class:`StorageError`)
and the environment is then closed and opened again, as a facet's store is reset: LMDB marks
an environment whose meta page write failed as fatal, refusing every later transaction, reads
included, so without a reopen one failed write would stop every timer of the node for good.
The reopen runs in the committing thread (no other writer runs meanwhile) under
``_env_lock``, which readers hold for their few microseconds, so no transaction of the old
environment is open when it closes. Should the reopen itself fail, the index is *broken*:
reads fail with :class:`StorageError`, and the next write (or :meth:`repair`) tries again.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import lmdb

from .._errors import StorageError
from .._ids import FacetAddress
from ._store import open_environment, store_exists

if TYPE_CHECKING:
    from collections.abc import Callable, Container, Iterator
    from pathlib import Path

    from ._store import StoreHooks

_DUE: Final = b"due"
_FACETS: Final = b"facets"
_MS: Final = struct.Struct(">Q")

logger = logging.getLogger(__name__)


def facet_key(address: FacetAddress) -> bytes:
    return address.tenant_id.encode() + b"\x00" + address.agent_id.encode()


def _address_of(key: bytes) -> FacetAddress:
    tenant, separator, agent = key.partition(b"\x00")
    assert separator, f"malformed timer index key {key!r}"
    return FacetAddress(tenant.decode(), agent.decode())


def _keys_between(
    cursor: lmdb.Cursor[bytes], start: bytes | None, stop: bytes | None
) -> Iterator[bytes]:
    """Keys after ``start`` (exclusive; None: from the first) up to ``stop`` (inclusive;
    None: to the last), in order."""
    positioned = cursor.first() if start is None else cursor.set_range(start)
    while positioned:
        key = cursor.key()
        if stop is not None and key > stop:
            return
        if key != start:
            yield key
        positioned = cursor.next()


@dataclass(slots=True)
class _Operation:
    apply: Callable[[lmdb.Transaction[bytes]], object]
    reopen: bool = False  # open the environment again first (a repair)
    done: bool = False
    result: object = None
    error: BaseException | None = None


@dataclass(slots=True)
class _GroupCommit:
    """Leader/follower group commit: whoever finds no commit running commits the queue."""

    condition: threading.Condition = field(default_factory=threading.Condition)
    queue: list[_Operation] = field(default_factory=list)
    committing: bool = False


class TimerIndex:
    """The timer hints of one data directory. Open one per process (the runtime's).

    ``hooks.before_index_commit`` (tests only) runs inside each group commit, before it commits.

    Raises:
        StorageError: LMDB could not open the environment.
    """

    def __init__(
        self,
        path: Path,
        *,
        map_size_bytes: int,
        readers_max: int,
        hooks: StoreHooks | None = None,
    ) -> None:
        self.path = path
        self._before_commit = None if hooks is None else hooks.before_index_commit
        self._map_size_bytes = map_size_bytes
        self._readers_max = readers_max
        self._env_lock = threading.Lock()
        self._broken = False
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot open the timer index at {str(path)!r}: {exc}") from exc
        self._open()
        self._group = _GroupCommit()

    def _open(self) -> None:
        """Open the environment and its dbs. Raises StorageError."""
        try:
            self._env = open_environment(
                self.path,
                map_size_bytes=self._map_size_bytes,
                max_dbs=2,
                max_readers=self._readers_max,
            )
            with self._env.begin(write=True) as txn:
                self._due = self._env.open_db(_DUE, txn=txn)
                self._facets = self._env.open_db(_FACETS, txn=txn)
        except (lmdb.Error, OSError) as exc:
            raise StorageError(f"cannot open the timer index at {str(self.path)!r}: {exc}") from exc

    def close(self) -> None:
        self._env.close()

    def _reopen(self) -> None:
        """Close and open the environment again (after a failed commit).

        Only from the committing thread, so that no write transaction is open; readers are
        kept out by ``_env_lock``. Raises StorageError (the index stays broken).
        """
        with self._env_lock:
            self._broken = True
            self._env.close()
            self._open()
            self._broken = False

    # -- writes (writer threads; blocking) --------------------------------------------------

    def lower(self, address: FacetAddress, due_ms: int) -> int:
        """Make the hint of ``address`` at most ``due_ms``; return the hint now held.

        Never raises a hint, so it is safe before the facet commit it prepares.

        Raises:
            StorageError: the index could not be written (the facet commit must not follow).
        """
        key = facet_key(address)

        def apply(txn: lmdb.Transaction[bytes]) -> int:
            current = self._hint_in(txn, key)
            if current is not None and current <= due_ms:
                return current
            self._replace(txn, key, current, due_ms)
            return due_ms

        result = self._run(apply)
        assert isinstance(result, int)
        return result

    def settle(self, address: FacetAddress, due_ms: int | None) -> None:
        """Set the hint of ``address`` to exactly ``due_ms`` (None: remove it).

        Only after the facet commit that leaves ``due_ms`` as its earliest timer is durable.

        Raises:
            StorageError: the index could not be written (the old hint stays: harmless).
        """
        key = facet_key(address)

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            current = self._hint_in(txn, key)
            if current != due_ms:
                self._replace(txn, key, current, due_ms)

        self._run(apply)

    def forget_if_missing(self, address: FacetAddress, store_path: Path) -> bool:
        """Remove the hint of a facet whose store does not exist (it was deleted).

        The existence check runs inside the index's write transaction: a facet created
        meanwhile has its store before any of its own index writes, which wait for this one.

        Returns:
            whether a hint was removed.
        """
        key = facet_key(address)

        def apply(txn: lmdb.Transaction[bytes]) -> bool:
            current = self._hint_in(txn, key)
            if current is None or store_exists(store_path):
                return False
            self._replace(txn, key, current, None)
            return True

        return bool(self._run(apply))

    def repair(self) -> None:
        """Close and open the environment again, between two group commits: after reads
        failed (it was left broken, or LMDB refuses it). Blocking: for a writer thread.

        Raises:
            StorageError: it could not be reopened.
        """
        self._run(lambda txn: None, reopen=True)

    def _hint_in(self, txn: lmdb.Transaction[bytes], key: bytes) -> int | None:
        raw = txn.get(key, db=self._facets)
        return None if raw is None else int(_MS.unpack(raw)[0])

    def _replace(
        self, txn: lmdb.Transaction[bytes], key: bytes, current: int | None, due_ms: int | None
    ) -> None:
        if current is not None:
            txn.delete(_MS.pack(current) + key, db=self._due)
        if due_ms is None:
            txn.delete(key, db=self._facets)
        else:
            txn.put(_MS.pack(due_ms) + key, b"", db=self._due)
            txn.put(key, _MS.pack(due_ms), db=self._facets)

    def _run(
        self, apply: Callable[[lmdb.Transaction[bytes]], object], *, reopen: bool = False
    ) -> object:
        operation = _Operation(apply, reopen=reopen)
        group = self._group
        with group.condition:
            group.queue.append(operation)
            while not operation.done:
                if group.committing:
                    group.condition.wait()
                    continue
                group.committing = True
                batch, group.queue = group.queue, []
                group.condition.release()
                try:
                    self._commit(batch)
                finally:
                    group.condition.acquire()
                    group.committing = False
                    group.condition.notify_all()
        if operation.error is not None:
            raise operation.error
        return operation.result

    def _commit(self, batch: list[_Operation]) -> None:
        """Apply every operation of ``batch`` in one durable transaction (all or none)."""
        error: StorageError | None = None
        results: list[object] = []
        committed = False
        try:
            if self._broken or any(operation.reopen for operation in batch):
                self._reopen()
            with self._env.begin(write=True) as txn:
                results = [operation.apply(txn) for operation in batch]
                if self._before_commit is not None:
                    self._before_commit(self.path)  # tests: raising aborts the transaction
            committed = True
        except StorageError as exc:
            error = exc  # broken and the reopen failed again, or an injected fault
        except (lmdb.Error, OSError) as exc:
            error = StorageError(f"timer index commit failed in {str(self.path)!r}: {exc}")
            error.__cause__ = exc
            self._reset()
        finally:
            # Also on a bug (an exception we do not expect): every waiter must learn the end
            # of its operation, or its writer thread would wait forever.
            # Only a transaction that committed has results: one aborted by anything at all
            # (a fault hook raising something unexpected included) fails every operation.
            for index, operation in enumerate(batch):
                if committed:
                    operation.result = results[index]
                else:
                    operation.error = error or StorageError("timer index commit did not finish")
                operation.done = True

    def _reset(self) -> None:
        """After a failed commit: reopen, since LMDB may now refuse every transaction."""
        try:
            self._reopen()
        except StorageError as exc:
            logger.error("the timer index stays unavailable until it can be reopened: %s", exc)

    # -- reads (event loop) -----------------------------------------------------------------

    def _check_readable(self) -> None:
        """Raise StorageError while broken (call with ``_env_lock`` held)."""
        if self._broken:
            raise StorageError(
                f"timer index {str(self.path)!r} is unavailable: a failed commit left it "
                "closed and it could not be reopened yet"
            )

    def due(
        self, now_ms: int, *, skip: Container[FacetAddress], limit: int
    ) -> tuple[list[FacetAddress], int | None]:
        """Facets with a hint at or before ``now_ms`` (earliest first), leaving out ``skip``.

        Returns:
            (at most ``limit`` facets, the earliest hint after ``now_ms`` not skipped, or None
            when there is none or the scan stopped at ``limit``).
        """
        found, _, next_ms = self.due_after(now_ms, after=None, skip=skip, limit=limit)
        return found, next_ms

    def due_after(
        self, now_ms: int, *, after: bytes | None, skip: Container[FacetAddress], limit: int
    ) -> tuple[list[FacetAddress], bytes | None, int | None]:
        """Like :meth:`due`, but the scan starts after the position ``after`` and wraps
        around to the start, so that facets whose wakes keep failing (their hints stay the
        earliest) cannot hold back the facets due after them: each due facet gets its turn.

        Returns:
            (at most ``limit`` facets, the position of the last one when the scan stopped at
            ``limit`` (pass it as ``after`` next time) or None when it saw every due hint,
            the earliest hint after ``now_ms`` or None as for :meth:`due`).
        """
        found: list[FacetAddress] = []
        next_ms: int | None = None
        segments = [(after, None)] if after is None else [(after, None), (None, after)]
        try:
            with self._env_lock:
                self._check_readable()
                with self._env.begin(db=self._due) as txn, txn.cursor() as cursor:
                    for start, stop in segments:
                        for key in _keys_between(cursor, start, stop):
                            due_ms = int(_MS.unpack_from(key)[0])
                            if due_ms > now_ms:
                                next_ms = due_ms if next_ms is None else min(next_ms, due_ms)
                                break
                            address = _address_of(key[_MS.size :])
                            if address in skip:
                                continue
                            found.append(address)
                            if len(found) >= limit:
                                return found, key, None
        except lmdb.Error as exc:
            raise StorageError(f"timer index read failed in {str(self.path)!r}: {exc}") from exc
        return found, None, next_ms

    def hint_of(self, address: FacetAddress) -> int | None:
        """The hint of ``address`` (ms since the epoch), or None."""
        try:
            with self._env_lock:
                self._check_readable()
                with self._env.begin(db=self._facets) as txn:
                    raw = txn.get(facet_key(address))
        except lmdb.Error as exc:
            raise StorageError(f"timer index read failed in {str(self.path)!r}: {exc}") from exc
        return None if raw is None else int(_MS.unpack(raw)[0])

    def count(self) -> int:
        """How many facets have a hint.

        Raises:
            StorageError: the index cannot be read.
        """
        try:
            with self._env_lock:
                self._check_readable()
                with self._env.begin() as txn:
                    return int(txn.stat(self._facets)["entries"])
        except lmdb.Error as exc:
            raise StorageError(f"timer index read failed in {str(self.path)!r}: {exc}") from exc
