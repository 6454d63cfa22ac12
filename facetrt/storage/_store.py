"""FacetStore: one LMDB environment holding one facet's state, synchronous, no trio.

On-disk layout of one store (a directory named by hashes, see ``facetrt._ids``)::

    data.mdb, lock.mdb      one LMDB environment
      db "data"             the facet's own keys (UTF-8, 1-511 bytes) -> msgpack values
      db "meta"             b"class" -> class name, b"tenant", b"agent", b"created" (msgpack)
      db "idem"             idempotency key (UTF-8) -> msgpack [expires_unix, method, result]
      db "timers"           timer name (UTF-8) -> msgpack record (runtime/_timer_state.py)

Rules (STYLE §8):
- Every ``lmdb.open`` option is passed explicitly; durability is on (``sync``, ``metasync``,
  ``writemap=False``) so a commit has returned from fsync before anything is acknowledged.
- Each method opens, uses and closes its own transaction. Reads run on the caller's thread
  (the event loop: they take microseconds); :meth:`commit` runs on a writer thread.
- :meth:`grow` (``mdb_env_set_mapsize``) is only legal when no transaction of this environment
  is active in the process; the owning activation calls it between commits, on the loop thread,
  where no read can be open because reads never cross an ``await``.
- ``lmdb.Error`` becomes :class:`StorageError` here and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import lmdb

from .._errors import StorageError, StoreFullError

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator, Sequence
    from pathlib import Path

DATA_DB: Final = b"data"
META_DB: Final = b"meta"
IDEM_DB: Final = b"idem"
TIMERS_DB: Final = b"timers"
SYSTEM_DBS: Final = (META_DB, IDEM_DB, TIMERS_DB)
KEY_BYTES_MAX: Final = 511
DATA_FILE: Final = "data.mdb"
LOCK_FILE: Final = "lock.mdb"
LOCK_HEADER_BYTES: Final = 128
READER_SLOT_BYTES: Final = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreHooks:
    """Fault and delay injection for tests; runs on the writer thread inside :meth:`commit`.

    ``before_commit(path)`` may block (a delay) or raise (a failed commit: the transaction is
    aborted and the caller sees :class:`StorageError`). ``before_index_commit(path)`` does the
    same inside each group commit of the node's timer index (``TimerIndex``): raising fails
    every operation of that batch (a lower, a settle) and writes nothing.
    """

    before_commit: Callable[[Path], None] | None = None
    before_index_commit: Callable[[Path], None] | None = None


@dataclass(slots=True, kw_only=True)
class CommitBatch:
    """The writes of one or more messages, applied in one LMDB write transaction.

    Attributes:
        cleared: drop every key of the data db first (``delete_all``).
        data: key -> encoded value, or None to delete; keys are unique by construction.
        system: (db name, key) -> value or None, for the meta, idem and timers dbs.
    """

    cleared: bool = False
    data: dict[bytes, bytes | None] = field(default_factory=dict)
    system: dict[tuple[bytes, bytes], bytes | None] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.cleared and not self.data and not self.system


class FacetStore:
    """One facet's LMDB environment. Create only through ``StoreRegistry``.

    Args:
        path: the store directory (created if missing, with its parents fsynced).
        map_size_bytes: initial map size; doubled by :meth:`grow` up to ``map_size_bytes_max``.
        hooks: fault injection for tests.
        root: the data directory ``path`` lies under: a new store fsyncs every directory
            between them, not only those it created (see :func:`_sync_new_store`).
        unsynced: fsync the directories even if the store exists: its creation may have been
            killed after LMDB wrote the data file but before those fsyncs.

    Raises:
        StorageError: LMDB could not open the environment.
    """

    def __init__(
        self,
        path: Path,
        *,
        map_size_bytes: int,
        map_size_bytes_max: int,
        hooks: StoreHooks | None = None,
        root: Path | None = None,
        unsynced: bool = False,
    ) -> None:
        self.path = path
        self.map_size_bytes_max = map_size_bytes_max
        self._hooks = hooks or StoreHooks()
        try:
            self._open(path, map_size_bytes, root, unsynced)
        except OSError as exc:  # mkdir, fsync, EMFILE, ENOSPC...: this facet fails, not the node
            raise StorageError(f"cannot open store {str(path)!r}: {exc}") from exc

    def _open(self, path: Path, map_size_bytes: int, root: Path | None, unsynced: bool) -> None:
        created = _make_dirs(path)
        existing = _file_size(path / DATA_FILE)
        is_new = existing == 0  # no data file, or one LMDB never initialised
        env: lmdb.Environment | None = None
        try:
            self.map_size_bytes = max(map_size_bytes, _pow2_at_least(existing))
            env = open_environment(
                path, map_size_bytes=self.map_size_bytes, max_dbs=len(SYSTEM_DBS) + 2
            )
            while True:
                try:
                    self._open_dbs(env)
                    break
                except lmdb.MapFullError:
                    # A store missing a system db (an import leaves out the empty ones) that
                    # fills its map to the last page has no room to create it: grow the map,
                    # as a commit would (nothing else uses this environment yet).
                    if self.map_size_bytes * 2 > self.map_size_bytes_max:
                        raise
                    self.map_size_bytes *= 2
                    env.set_mapsize(self.map_size_bytes)
            if is_new or unsynced:
                _sync_new_store(path, created, root)
        except (lmdb.Error, OSError) as exc:
            if env is not None:
                env.close()
            if is_new:
                # Take back what this open made: a half-made store left in place would be
                # opened next time as an existing one, and its directories never fsynced.
                _remove_new_store(path, created)
            raise StorageError(f"cannot open store {str(path)!r}: {exc}") from exc
        self._env = env

    def _open_dbs(self, env: lmdb.Environment) -> None:
        # One write transaction for all named dbs: one commit, not one per db.
        with env.begin(write=True) as txn:
            self._data = env.open_db(DATA_DB, txn=txn)
            self._dbs = {DATA_DB: self._data}
            for name in SYSTEM_DBS:
                self._dbs[name] = env.open_db(name, txn=txn)

    # -- reads (event-loop thread) -------------------------------------------------------

    def get(self, key: bytes, db: bytes = DATA_DB) -> bytes | None:
        try:
            with self._env.begin(db=self._dbs[db]) as txn:
                return txn.get(key)
        except lmdb.Error as exc:
            raise StorageError(f"read failed in {str(self.path)!r}: {exc}") from exc

    def get_many(self, keys: Sequence[bytes], db: bytes = DATA_DB) -> list[bytes | None]:
        try:
            with self._env.begin(db=self._dbs[db]) as txn:
                return [txn.get(key) for key in keys]
        except lmdb.Error as exc:
            raise StorageError(f"read failed in {str(self.path)!r}: {exc}") from exc

    def iterate(
        self,
        *,
        low: bytes | None,
        high: bytes | None,
        reverse: bool,
        db: bytes = DATA_DB,
    ) -> Generator[tuple[bytes, bytes], None, None]:
        """Yield ``(key, value)`` with ``low <= key < high`` in key order (or reversed).

        The generator holds a read transaction until it is exhausted or closed; callers must
        close it before they yield control (``contextlib.closing``).
        """
        try:
            with self._env.begin(db=self._dbs[db]) as txn, txn.cursor() as cursor:
                if reverse:
                    yield from _iterate_reverse(cursor, low, high)
                else:
                    yield from _iterate_forward(cursor, low, high)
        except lmdb.Error as exc:
            raise StorageError(f"read failed in {str(self.path)!r}: {exc}") from exc

    def count(self, db: bytes = DATA_DB) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._dbs[db])["entries"])

    # -- writes (writer thread) -----------------------------------------------------------

    def commit(self, batch: CommitBatch) -> None:
        """Apply ``batch`` in one durable write transaction; return after fsync.

        Raises:
            StoreFullError: the map is full at its current size (the owner may :meth:`grow`).
            StorageError: any other LMDB failure or an injected fault; nothing was written.
        """
        try:
            with self._env.begin(write=True) as txn:
                if batch.cleared:
                    txn.drop(self._data, delete=False)
                _apply(txn, self._data, batch.data)
                for (name, key), value in batch.system.items():
                    if value is None:
                        txn.delete(key, db=self._dbs[name])
                    else:
                        txn.put(key, value, db=self._dbs[name])
                if self._hooks.before_commit is not None:
                    self._hooks.before_commit(self.path)
        except lmdb.MapFullError as exc:
            raise StoreFullError(
                f"store {str(self.path)!r} is full at {self.map_size_bytes} bytes"
            ) from exc
        except lmdb.Error as exc:
            raise StorageError(f"commit failed in {str(self.path)!r}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"commit failed in {str(self.path)!r}: {exc}") from exc

    def grow(self) -> bool:
        """Double the map size, up to the maximum; False when already at the maximum.

        Only legal when no transaction of this environment is active in the process.
        """
        if self.map_size_bytes >= self.map_size_bytes_max:
            return False
        size = min(self.map_size_bytes * 2, self.map_size_bytes_max)
        try:
            self._env.set_mapsize(size)
        except lmdb.Error as exc:
            raise StorageError(f"cannot grow store {str(self.path)!r}: {exc}") from exc
        self.map_size_bytes = size
        return True

    def close(self) -> None:
        self._env.close()

    # -- operators (writer thread) ----------------------------------------------------------

    def copy_to(self, directory: Path) -> None:
        """Write a compacted, consistent copy of the environment to ``directory``/data.mdb.

        LMDB copies inside one read transaction, so the copy is the state of one commit and
        writers go on meanwhile. Not fsynced here (the caller fsyncs file and directory).
        The caller guarantees that the map is not resized meanwhile (see ``Activation.pin``).

        Raises:
            StorageError: the copy failed (``directory`` must exist and hold no data.mdb).
        """
        try:
            self._env.copy(str(directory), compact=True)
        except lmdb.Error as exc:
            raise StorageError(f"cannot copy store {str(self.path)!r}: {exc}") from exc

    def hint_fields(self) -> dict[str, object]:
        """What listings show without opening the store: class and, if kept, timer count."""
        raw = self.get(b"class", META_DB)
        fields: dict[str, object] = {"class": None if raw is None else _unpack_text(raw)}
        if TIMERS_DB in self._dbs:
            fields["timers"] = self.count(TIMERS_DB)
        return fields


def _unpack_text(raw: bytes) -> str | None:
    """A msgpack str (fixstr, str 8 or str 16: class names and ids, at most 256 characters),
    decoded without msgpack (the storage layer does not import it); None for anything else."""
    if raw and 0xA0 <= raw[0] <= 0xBF:
        length, body = raw[0] & 0x1F, raw[1:]
    elif len(raw) >= 2 and raw[0] == 0xD9:
        length, body = raw[1], raw[2:]
    elif len(raw) >= 3 and raw[0] == 0xDA:
        length, body = int.from_bytes(raw[1:3], "big"), raw[3:]
    else:
        return None
    try:
        return body.decode() if len(body) == length else None
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreIdentity:
    """Who a store belongs to, as its meta db says (written with the facet's first commit)."""

    tenant: str
    agent: str
    class_name: str | None


def read_identity(path: Path) -> StoreIdentity | None:
    """The ids in the meta db of the store at ``path``, or None if it has none (never
    committed) or cannot be read.

    For listings whose hint file is missing or torn (written in place and without fsync: a
    listing racing its rewrite, a crash mid-write, a power failure): a facet must not vanish
    from a backup or an operator's view for want of a hint. Opened read-only without the lock
    file, so no lock is taken or dropped: safe while this process has the store open (closing
    a second handle that used the lock file would drop the process's locks on it). Without a
    reader slot a read racing two commits could see recycled pages; the caller checks the ids
    against the directory's hashed name, so garbage cannot name a facet.
    """
    try:
        env = open_readonly(path, max_dbs=len(SYSTEM_DBS) + 2, readahead=False)
    except lmdb.Error:
        return None
    try:
        with env.begin() as txn:
            meta = env.open_db(META_DB, txn=txn, create=False)
            tenant, agent, class_name = (
                txn.get(key, db=meta) for key in (b"tenant", b"agent", b"class")
            )
    except lmdb.Error:  # no meta db (an empty store), or unreadable
        return None
    finally:
        env.close()
    tenant_id = None if tenant is None else _unpack_text(tenant)
    agent_id = None if agent is None else _unpack_text(agent)
    if tenant_id is None or agent_id is None:
        return None
    return StoreIdentity(
        tenant=tenant_id,
        agent=agent_id,
        class_name=None if class_name is None else _unpack_text(class_name),
    )


def open_readonly(path: Path, *, max_dbs: int, readahead: bool = True) -> lmdb.Environment:
    """Open the store at ``path`` read-only without its lock file: private copies (nothing
    else uses them) and :func:`read_identity`. Raises ``lmdb.Error``."""
    return lmdb.open(
        str(path),
        map_size=1 << 20,  # read-only: LMDB maps the whole file whatever this says
        subdir=True,
        readonly=True,
        lock=False,
        max_dbs=max_dbs,
        max_readers=1,
        max_spare_txns=0,
        readahead=readahead,
        create=False,
    )


def open_environment(
    path: Path,
    *,
    map_size_bytes: int,
    max_dbs: int,
    max_readers: int = 16,
    create: bool = True,
    durable: bool = True,
    max_spare_txns: int = 1,
) -> lmdb.Environment:
    """Open one LMDB environment with every option explicit (STYLE §8).

    Durable by default: a commit returns after fsync of data and meta (``sync``,
    ``metasync``), through ``write()`` rather than a writable map (``writemap=False``: a stray
    pointer cannot scribble on the file). ``durable=False`` only for scratch stores that are
    synced once by their owner before use (imports). Files are private (0600). The lock file
    gets its disk space first (:func:`reserve_lock_file`). Raises ``lmdb.Error``.
    """
    if path.is_dir():
        reserve_lock_file(path, max_readers)
    return lmdb.open(
        str(path),
        map_size=map_size_bytes,
        subdir=True,
        readonly=False,
        metasync=durable,
        sync=durable,
        map_async=False,
        mode=0o600,
        create=create,
        readahead=False,
        writemap=False,
        meminit=True,
        max_readers=max_readers,
        max_dbs=max_dbs,
        max_spare_txns=max_spare_txns,
        lock=True,
    )


def lock_file_bytes(max_readers: int) -> int:
    """The size LMDB gives ``lock.mdb`` (0.9, 64-bit Linux): a 128-byte header, then one
    64-byte slot per reader."""
    return LOCK_HEADER_BYTES + READER_SLOT_BYTES * max_readers


def reserve_lock_file(path: Path, max_readers: int) -> None:
    """Allocate the disk space of the environment's lock file before LMDB maps it.

    LMDB writes its lock file through a shared memory map. Where the file has no blocks yet (a
    new file that LMDB extends with ``ftruncate``), the first write to a page must allocate
    one, and on a full file system that page fault is ``SIGBUS``: the whole node would die
    creating one facet's store. Allocated here first, the same full disk is an ``ENOSPC``
    for that facet alone. Costs one ``fallocate`` per open (nothing to do once allocated).

    Raises:
        lmdb.Error: the space cannot be allocated (``ENOSPC``, ``EFBIG``, ...).
    """
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = max(os.fstat(fd).st_size, lock_file_bytes(max_readers))
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise lmdb.Error(f"cannot allocate the lock file {str(lock_path)!r}: {exc}") from exc


def _apply(txn: lmdb.Transaction[bytes], db: object, ops: dict[bytes, bytes | None]) -> None:
    puts = [(key, value) for key, value in ops.items() if value is not None]
    if puts:
        with txn.cursor(db) as cursor:  # type: ignore[arg-type]  # _Database is private in stubs
            cursor.putmulti(puts)
    if len(puts) != len(ops):
        for key, value in ops.items():
            if value is None:
                txn.delete(key, db=db)  # type: ignore[arg-type]  # _Database is private in stubs


def _iterate_forward(
    cursor: lmdb.Cursor[bytes], low: bytes | None, high: bytes | None
) -> Iterator[tuple[bytes, bytes]]:
    found = cursor.set_range(low) if low is not None else cursor.first()
    while found:
        key = cursor.key()
        if high is not None and key >= high:
            return
        yield key, cursor.value()
        found = cursor.next()


def _iterate_reverse(
    cursor: lmdb.Cursor[bytes], low: bytes | None, high: bytes | None
) -> Iterator[tuple[bytes, bytes]]:
    if high is None:
        found = cursor.last()
    else:
        # set_range lands on the first key >= high, which is excluded: step back once.
        found = cursor.prev() if cursor.set_range(high) else cursor.last()
    while found:
        key = cursor.key()
        if low is not None and key < low:
            return
        yield key, cursor.value()
        found = cursor.prev()


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and missing parents; return the directories created, outermost first."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    return list(reversed(missing))


def _sync_new_store(path: Path, created: list[Path], root: Path | None) -> None:
    """Make a new store's directory entries durable: the store's files in its own directory
    and each directory's entry in its parent, so that the first acknowledged commit cannot
    vanish with a directory.

    With ``root``, every directory up to it, not only those this open created: a parent that
    another open created may not be durable yet (that open's fsync still running, or its
    process killed before it ran), and the data acknowledged from this store would depend on
    it (decision 0012). An fsync of a directory with nothing to write costs ~40 us here.
    """
    parents = {directory.parent for directory in created}
    if root is not None:
        for directory in path.parents:
            parents.add(directory)
            if directory == root:
                break
        else:  # not under root: a caller's mistake, not a reason to sync the whole tree
            raise OSError(f"store {str(path)!r} is not under {str(root)!r}")
    for directory in sorted(parents, key=lambda each: len(each.parts)):  # outermost first
        fsync_dir(directory)
    fsync_dir(path)


def _remove_new_store(path: Path, created: list[Path]) -> None:
    """Undo a store creation that failed before it was durable (nothing was acknowledged
    from it): its files, then the directories this open created, innermost first, each only
    if empty (another facet's creation may be using a parent meanwhile). Best effort: what
    is left is opened as a new store again next time (an empty or missing data file)."""
    try:
        for name in (DATA_FILE, LOCK_FILE):
            (path / name).unlink(missing_ok=True)
        for directory in reversed(created):
            directory.rmdir()
    except OSError:
        pass  # not empty, or the disk refuses: stop here


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (mode 0600), durably: the file and its name.

    Created fresh (what is there is removed first, then ``O_EXCL``): ``O_TRUNC`` would keep a
    leftover file's mode, and would write through a link planted under that name. For the
    temporary file of a key written then renamed into place (admin key, node key).
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a file created, renamed or removed in
    it): fsync of a file alone does not cover its name."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _pow2_at_least(size: int) -> int:
    result = 1
    while result < size:
        result *= 2
    return result


def store_exists(path: Path) -> bool:
    """Whether a store was ever created at ``path`` (without opening it)."""
    return (path / DATA_FILE).is_file()
