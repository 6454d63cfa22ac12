"""The durable audit log of outbound attempts: one LMDB environment per tenant, group-committed.

Layout (``<data dir>/tenants/<h(tenant)>/audit/``, beside the tenant's ``facets/``)::

    data.mdb, lock.mdb   one LMDB environment, default db only
      key    8-byte big-endian wall-clock nanoseconds, 4-byte big-endian node sequence
      value  JSON object, the fields of :class:`AuditRecord` (``AuditRecord.to_json``)

Keys sort by time, so ``--since`` is a cursor seek and retention removes from the front.

Durability (decision 0014). :meth:`AuditLog.attempt` returns only once the record is
fsynced: the caller sends nothing before. Concurrent attempts share commits: one writer task
takes every queued write, groups them by tenant and commits each tenant's in one transaction
on a worker thread (one fsync per tenant per batch); attempts arriving meanwhile form the next
batch. :meth:`AuditLog.complete_nowait` queues the completed record (status, bytes, latency,
error class) under the same key without waiting: the request is over, nothing waits on it, so
completions alone wait up to ``COMPLETION_DELAY_SECONDS`` for the next attempt's commit
instead of paying an fsync of their own (a reader flushes them at once).

Bounds: at most ``audit_pending_max`` attempts queued (then :meth:`attempt` waits for room);
completions are bounded by the attempts in flight; at most ``audit_open_max`` environments
open (least recently used closed first). Retention: after each commit the oldest records of the
tenant go beyond ``audit_records_max`` or older than ``audit_retention_seconds``.

Threads: every environment operation (open, write, read, close) runs under one lock on a
worker thread, so an environment is never closed under a reader and never opened twice.
"""

from __future__ import annotations

import collections
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, final

import lmdb
import trio

from .._errors import InternalError, StorageError
from ..storage import open_environment, tenant_path

if TYPE_CHECKING:
    from pathlib import Path

    from ._model import EgressConfig

logger = logging.getLogger(__name__)

AUDIT_DIR: Final = "audit"
KEY: Final = struct.Struct(">QI")
PAGE_MAX: Final = 10_000
# Completions alone wait this long for an attempt to share a commit with.
COMPLETION_DELAY_SECONDS: Final = 0.2


@dataclass(slots=True, kw_only=True)
class AuditRecord:
    """One outbound attempt. Created when it is decided; completed when it ends.

    ``decision`` is ``allowed`` or ``denied``; ``rule`` the deciding rule and ``reason`` its
    class (``_decide.REASONS``). ``error`` is None for a completed success, else one of
    ``policy_violation``, the FetchError kinds, ``cancelled`` or ``incomplete`` (the attempt
    was sent but the process stopped before it ended: the record as written before sending).
    ``path`` has its query values replaced by ``[redacted]``.
    """

    time: float
    tenant: str
    agent: str | None
    run: str | None
    source: str  # "fetch" or "proxy"
    method: str
    scheme: str
    host: str
    port: int
    path: str
    decision: str
    rule: str
    reason: str
    address: str | None = None
    status: int | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    latency_seconds: float | None = None
    error: str | None = "incomplete"
    key: bytes = field(default=b"", repr=False)

    def to_json(self) -> dict[str, Any]:
        # Field by field: dataclasses.asdict deep-copies every value (a third of the record's
        # cost on the fetch path).
        return {name: getattr(self, name) for name in _FIELDS}


_FIELDS: Final = tuple(name for name in AuditRecord.__dataclass_fields__ if name != "key")


@dataclass(slots=True)
class _Batch:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditStatistics:
    records: int
    commits: int
    commit_seconds: float
    pruned: int
    failures: int


@final
class AuditLog:
    """Every tenant's audit log on this node. Start :meth:`run` in a nursery before use."""

    def __init__(self, data_dir: Path, config: EgressConfig) -> None:
        self._data_dir = data_dir
        self._config = config
        self._pending: list[tuple[str, bytes, bytes]] = []
        self._batch = _Batch()
        self._writing: _Batch | None = None  # the batch being committed
        self._attempts_queued = 0
        self._urgent = False
        self._wake = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._sequence = 0
        self._envs: collections.OrderedDict[str, lmdb.Environment] = collections.OrderedDict()
        self._lock = threading.Lock()  # every environment operation holds it
        self._closed = False
        self._records = self._commits = self._pruned = self._failures = 0
        self._commit_seconds = 0.0

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(
            records=self._records,
            commits=self._commits,
            commit_seconds=self._commit_seconds,
            pruned=self._pruned,
            failures=self._failures,
        )

    # -- writing (loop thread) -------------------------------------------------------------

    async def attempt(self, record: AuditRecord) -> None:
        """Write ``record`` durably and return once it is fsynced; sets ``record.key``.

        Cancellation while waiting leaves the record queued: it is written anyway.

        Raises:
            InternalError: the audit log could not be written (the attempt must not proceed).
        """
        while self._attempts_queued >= self._config.audit_pending_max:
            await self._room.park()
        if self._closed:
            raise InternalError("the audit log is closed; nothing was sent")
        record.key = self._next_key(record.time)
        batch = self._batch
        self._pending.append((record.tenant, record.key, _encode(record)))
        self._attempts_queued += 1
        self._wake.unpark_all()
        await batch.done.wait()
        if batch.error is not None:
            raise InternalError(
                f"the audit log could not be written, so nothing was sent: {batch.error}"
            )

    def complete_nowait(self, record: AuditRecord) -> None:
        """Queue the completed ``record`` (written with the next batch); never checkpoints."""
        assert record.key, "complete_nowait needs a record written by attempt()"
        if self._closed:
            logger.warning("audit log closed: completion of an attempt of %s lost", record.tenant)
            return
        self._pending.append((record.tenant, record.key, _encode(record)))
        self._wake.unpark_all()

    async def wait_flushed(self) -> None:
        """Wait until every write queued so far (completions included) is committed."""
        await trio.lowlevel.checkpoint()
        if self._pending:
            self._urgent = True  # do not hold completions back for company
            self._wake.unpark_all()
            await self._batch.done.wait()  # batches commit in order: the earlier ones too
        elif self._writing is not None:
            await self._writing.done.wait()

    def _next_key(self, when: float) -> bytes:
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return KEY.pack(int(when * 1e9), self._sequence)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: commit batches until cancelled, then flush what is queued and
        close every environment (bounded by the disk)."""
        task_status.started()
        try:
            while True:
                while not self._pending:
                    await self._wake.park()
                if not self._attempts_queued and not self._urgent:
                    # Only completions: nothing waits on them, so let them share the next
                    # attempt's fsync instead of costing one of their own (bounded wait).
                    with trio.move_on_after(COMPLETION_DELAY_SECONDS):
                        while not self._attempts_queued and not self._urgent:
                            await self._wake.park()
                await self._commit_batch()
        finally:
            self._closed = True
            with trio.CancelScope(shield=True):
                # Shielded without a deadline: only writer-thread jobs remain, which cannot be
                # abandoned (LMDB binds a write transaction to its thread).
                while self._pending:
                    await self._commit_batch()
                await trio.to_thread.run_sync(self._close_all)

    async def _commit_batch(self) -> None:
        pending, self._pending = self._pending, []
        batch, self._batch = self._batch, _Batch()
        self._writing = batch
        self._urgent = False
        attempts = self._attempts_queued
        self._attempts_queued = 0
        self._room.unpark_all()
        started = time.perf_counter()
        try:
            await trio.to_thread.run_sync(self._write, pending)
        except StorageError as exc:
            self._failures += 1
            logger.error("audit log write failed (%d records): %s", len(pending), exc)
            batch.error = exc
        else:
            self._commits += 1
            self._records += attempts
            self._commit_seconds += time.perf_counter() - started
        self._writing = None
        batch.done.set()

    # -- worker thread ---------------------------------------------------------------------

    def _write(self, pending: list[tuple[str, bytes, bytes]]) -> None:
        by_tenant: dict[str, list[tuple[bytes, bytes]]] = {}
        for tenant, key, value in pending:
            by_tenant.setdefault(tenant, []).append((key, value))
        now = time.time()
        with self._lock:
            for tenant, items in by_tenant.items():
                env = self._env(tenant)
                try:
                    with env.begin(write=True) as txn:
                        for key, value in items:
                            txn.put(key, value)
                        self._pruned += self._prune(txn, now)
                except lmdb.Error as exc:
                    raise StorageError(f"audit log of tenant {tenant!r}: {exc}") from exc

    def _prune(self, txn: lmdb.Transaction[bytes], now: float) -> int:
        """Remove the oldest records beyond the count bound or older than the retention."""
        excess = txn.stat()["entries"] - self._config.audit_records_max
        cutoff = KEY.pack(int((now - self._config.audit_retention_seconds) * 1e9), 0)
        removed = 0
        cursor = txn.cursor()
        if not cursor.first():
            return 0
        while cursor.key() and (removed < excess or cursor.key() < cutoff):
            if not cursor.delete():
                break
            removed += 1
        return removed

    def _env(self, tenant: str) -> lmdb.Environment:
        """The tenant's open environment (opened on first use; LRU-bounded); lock held."""
        env = self._envs.get(tenant)
        if env is not None:
            self._envs.move_to_end(tenant)
            return env
        while len(self._envs) >= self._config.audit_open_max:
            _, oldest = self._envs.popitem(last=False)
            oldest.close()
        path = audit_path(self._data_dir, tenant)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            env = open_environment(
                path, map_size_bytes=self._config.audit_map_size_bytes, max_dbs=0, max_readers=16
            )
        except (OSError, lmdb.Error) as exc:
            raise StorageError(f"cannot open the audit log of tenant {tenant!r}: {exc}") from exc
        self._envs[tenant] = env
        return env

    def _close_all(self) -> None:
        with self._lock:
            for env in self._envs.values():
                env.close()
            self._envs.clear()

    # -- reading ---------------------------------------------------------------------------

    async def read(
        self, tenant: str, *, since: float | None, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of ``tenant``'s records, oldest first (see :func:`read_page`), including
        every write queued before the call."""
        await self.wait_flushed()
        return await trio.to_thread.run_sync(self._read, tenant, since, after, limit)

    def _read(
        self, tenant: str, since: float | None, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        with self._lock:
            if tenant not in self._envs and not (audit_path(self._data_dir, tenant)).exists():
                return [], None
            return read_page(self._env(tenant), since=since, after=after, limit=limit)


def audit_path(data_dir: Path, tenant: str) -> Path:
    """Where ``tenant``'s audit log lives: beside its facets, under its hashed directory."""
    return tenant_path(data_dir, tenant).parent / AUDIT_DIR


def read_page(
    env: lmdb.Environment, *, since: float | None, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` records from ``since`` (seconds since the epoch) or after the cursor
    ``after`` (the ``next`` of the previous page), oldest first; and the next cursor or None.

    Raises:
        StorageError: LMDB failed.
        ValueError: a malformed cursor.
    """
    assert 0 < limit <= PAGE_MAX
    start = b"" if since is None else KEY.pack(max(0, int(since * 1e9)), 0)
    if after is not None:
        start = max(start, bytes.fromhex(after) + b"\0")
    records: list[dict[str, Any]] = []
    last = b""
    try:
        with env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(start):
                for key, value in cursor:
                    if len(records) >= limit:
                        return records, last.hex()
                    records.append(json.loads(value))
                    last = key
    except lmdb.Error as exc:
        raise StorageError(f"cannot read the audit log: {exc}") from exc
    return records, None


def read_offline(
    data_dir: Path, tenant: str, *, since: float | None, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """:func:`read_page` on a data directory no daemon holds (the CLI's direct mode)."""
    path = audit_path(data_dir, tenant)
    if not (path / "data.mdb").exists():
        return [], None
    try:
        env = open_environment(path, map_size_bytes=1 << 20, max_dbs=0, create=False)
    except lmdb.Error as exc:
        raise StorageError(f"cannot open the audit log of tenant {tenant!r}: {exc}") from exc
    try:
        return read_page(env, since=since, after=after, limit=limit)
    finally:
        env.close()


def _encode(record: AuditRecord) -> bytes:
    return json.dumps(record.to_json(), separators=(",", ":")).encode()
