"""StoreRegistry: the only place that opens or closes a FacetStore, one open per path.

LMDB forbids opening one environment twice in a process (the second open would share and then
release the first one's locks), so every open goes through here, keyed by the resolved path.
The registry also holds the exclusive lock on the data directory, so two processes never share
one (SPEC §6).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .._errors import ConfigError, StorageError
from .._ids import FacetAddress
from ._store import (
    DATA_FILE,
    FacetStore,
    StoreHooks,
    StoreIdentity,
    read_identity,
    store_exists,
)

if TYPE_CHECKING:
    from collections.abc import Callable

LOCK_FILE: Final = "facetrt.lock"


class DataDirLock:
    """An exclusive, non-blocking ``flock`` on ``<data dir>/facetrt.lock``.

    Raises:
        ConfigError: another process holds the lock.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ConfigError(
                f"data directory {str(data_dir)!r} is in use by another process"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


ID_HINT_FILE: Final = "facet.id"


@dataclass(frozen=True, slots=True, kw_only=True)
class FacetRecord:
    """One facet as a listing shows it, read from its directory without opening LMDB.

    ``class_name`` and ``timers`` come from the hint file, as of the facet's last open or
    close (the store's meta db is the truth); ``size_bytes`` and ``last_active`` (the time
    of its last commit) from ``stat`` of its data file.
    """

    cursor: str
    tenant: str
    agent: str
    class_name: str | None
    size_bytes: int
    last_active: float
    timers: int | None


def write_hint(path: Path, address: FacetAddress, fields: dict[str, object]) -> None:
    """Record the ids (and ``fields``: class, timer count) in the store directory, so that
    listings need not open LMDB.

    A hint, not the truth (the store's meta db is): written without fsync and rewritten on
    every open and close, so a copy lost in a power failure comes back on the next activation.
    """
    hint = path / ID_HINT_FILE
    document = {"tenant": address.tenant_id, "agent": address.agent_id, **fields}
    data = json.dumps(document, separators=(",", ":")).encode()
    try:
        if hint.read_bytes() == data:
            return
    except OSError:
        pass
    # Written in place (no temporary file and rename: one inode less per new facet); a torn
    # or lost hint reads as garbage, listings then read the ids from the store's meta db
    # (_record), and the next open rewrites it.
    hint.write_bytes(data)


def _read_hint(path: Path) -> dict[str, object] | None:
    try:
        hint = json.loads((path / ID_HINT_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(hint, dict) or not isinstance(hint.get("agent"), str):
        return None
    return hint


def _record(
    directory: Path, name: str, identify: Callable[[Path], StoreIdentity | None]
) -> FacetRecord | None:
    try:
        stat = (directory / DATA_FILE).stat()
    except OSError:
        return None  # a directory without a store (being created or deleted)
    hint = _read_hint(directory)
    address = None if hint is None else _address_in(directory, hint)
    if hint is None or address is None:
        # Missing or torn (see write_hint): the store's meta db says who it belongs to. Only
        # a store never committed has no ids, and nothing to list or back up.
        identity = identify(directory)
        if identity is None:
            return None
        hint = {"tenant": identity.tenant, "agent": identity.agent, "class": identity.class_name}
        address = _address_in(directory, hint)
        if address is None:
            return None
    class_name, timers = hint.get("class"), hint.get("timers")
    return FacetRecord(
        cursor=name,
        tenant=address.tenant_id,
        agent=address.agent_id,
        class_name=class_name if isinstance(class_name, str) else None,
        size_bytes=stat.st_size,
        last_active=stat.st_mtime,
        timers=timers if isinstance(timers, int) else None,
    )


def _address_in(directory: Path, ids: dict[str, object]) -> FacetAddress | None:
    """The address ``ids`` name if it is the one ``directory`` is the store of."""
    try:
        address = FacetAddress(ids.get("tenant"), ids["agent"])  # type: ignore[arg-type]  # validated by FacetAddress
    except (KeyError, ValueError):
        return None
    if directory.parts[-4:] != address.relative_path().parts[-4:]:
        return None  # ids that do not belong here (a hint copied by hand, or garbage)
    return address


class StoreRegistry:
    """Canonical store path -> open FacetStore, for one data directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        map_size_bytes: int,
        map_size_bytes_max: int,
        hooks: StoreHooks | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self._map_size_bytes = map_size_bytes
        self._map_size_bytes_max = map_size_bytes_max
        self._hooks = hooks
        self._open: dict[Path, FacetStore] = {}
        # Stores being opened or open, by path: identify() answers for them instead of
        # opening them a second time, and no open can start while it reads one (the lock).
        self._held: dict[Path, FacetAddress] = {}
        self._held_lock = threading.Lock()

    @property
    def has_hooks(self) -> bool:
        """Whether fault or delay injection is installed (tests)."""
        return self._hooks is not None and self._hooks.before_commit is not None

    def path_of(self, address: FacetAddress) -> Path:
        return self.data_dir / address.relative_path()

    def exists(self, address: FacetAddress) -> bool:
        return store_exists(self.path_of(address))

    def open(self, address: FacetAddress, *, map_size_bytes_max: int | None = None) -> FacetStore:
        """Open (creating if needed) the store of ``address``. Blocking: call off the loop.

        Args:
            map_size_bytes_max: the most its map may grow to (the tenant's bytes-per-facet
                quota); the registry's default when None. A new store starts at the initial
                size or this, whichever is smaller; an existing bigger one keeps its size.

        Raises:
            StorageError: LMDB could not open it.
        """
        path = self.path_of(address)
        bytes_max = self._map_size_bytes_max if map_size_bytes_max is None else map_size_bytes_max
        with self._held_lock:  # checked and held at once: also refuses a concurrent open
            assert path not in self._held, f"store {path} opened twice"
            self._held[path] = address
        try:
            store = FacetStore(
                path,
                map_size_bytes=min(self._map_size_bytes, bytes_max),
                map_size_bytes_max=bytes_max,
                hooks=self._hooks,
                root=self.data_dir,
                # The hint is written once the store's directories are durable: without it,
                # a creation may have been killed between LMDB's first write and its fsyncs
                # (the data file is then not empty, and the store looks like an old one).
                unsynced=not (path / ID_HINT_FILE).exists(),
            )
            try:
                write_hint(path, address, store.hint_fields())
            except OSError as exc:
                store.close()
                raise StorageError(f"cannot write the id hint of {str(path)!r}: {exc}") from exc
        except BaseException:
            self._release_hold(path)
            raise
        self._open[path] = store
        return store

    def identify(self, directory: Path) -> StoreIdentity | None:
        """Who the store in ``directory`` belongs to, for a listing whose hint is missing or
        torn: the address it was opened with if this process holds it (LMDB forbids opening
        it again), else its meta db, read while no open of it can start. Blocking."""
        with self._held_lock:
            address = self._held.get(directory)
            if address is not None:  # open: the router knows its live class
                return StoreIdentity(
                    tenant=address.tenant_id, agent=address.agent_id, class_name=None
                )
            return read_identity(directory)

    def _release_hold(self, path: Path) -> None:
        with self._held_lock:
            self._held.pop(path, None)

    def tenant_path(self, tenant: str) -> Path:
        """The directory holding every facet of ``tenant`` (hashed)."""
        return tenant_path(self.data_dir, tenant)

    def list_facets(
        self, tenant: str, *, start_after: str | None = None, limit: int = 100
    ) -> list[FacetRecord]:
        """Facets of ``tenant`` in cursor order, without opening them.

        The cursor is the facet's directory name (a hash); pass the last one as
        ``start_after`` for the next page. A page costs a scan of the one or two fan-out
        directories it spans (a few thousand entries with millions of facets) and one hint
        read and ``stat`` per facet returned.
        """
        return list_facets_in(
            self.tenant_path(tenant), start_after=start_after, limit=limit, identify=self.identify
        )

    def count_facets(self, tenant: str) -> int:
        """How many facets ``tenant`` has on disk (a directory scan and one ``stat`` per
        facet: for the quota's first count, on a writer thread)."""
        return count_tenant_facets(self.data_dir, tenant)

    def tenant_roots(self) -> list[Path]:
        """The directory of every tenant with facets on disk (for node-wide operations)."""
        root = self.data_dir / "tenants"
        if not root.is_dir():
            return []
        return sorted(root / entry.name / "facets" for entry in os.scandir(root) if entry.is_dir())

    def close(self, store: FacetStore, address: FacetAddress | None = None) -> None:
        """Close ``store``; with its ``address``, first refresh its listing hint."""
        removed = self._open.pop(store.path, None)
        assert removed is store, f"store {store.path} closed but not open"
        try:
            if address is not None:
                write_hint(store.path, address, store.hint_fields())
        except (OSError, StorageError):
            pass  # only a hint: the next open rewrites it
        finally:
            store.close()
            self._release_hold(store.path)

    def open_count(self) -> int:
        return len(self._open)


def list_facets_in(
    root: Path,
    *,
    start_after: str | None = None,
    limit: int = 100,
    identify: Callable[[Path], StoreIdentity | None],
) -> list[FacetRecord]:
    """Facets under the tenant directory ``root``, in cursor order (see ``list_facets``);
    ``identify`` (:meth:`StoreRegistry.identify`) names a store whose hint is unreadable."""
    found: list[FacetRecord] = []
    if not root.is_dir():
        return found
    for fanout in sorted(entry.name for entry in os.scandir(root) if entry.is_dir()):
        if start_after is not None and fanout < start_after[:2]:
            continue
        for name in sorted(entry.name for entry in os.scandir(root / fanout)):
            if start_after is not None and name <= start_after:
                continue
            record = _record(root / fanout / name, name, identify)
            if record is not None:
                found.append(record)
                if len(found) >= limit:
                    return found
    return found


def tenant_path(data_dir: Path, tenant: str) -> Path:
    """The directory holding every facet of ``tenant`` under ``data_dir`` (hashed)."""
    return data_dir / FacetAddress(tenant, "x").relative_path().parent.parent


def count_tenant_facets(data_dir: Path, tenant: str) -> int:
    """How many facets ``tenant`` has under ``data_dir`` (see :func:`count_facets_in`)."""
    return count_facets_in(tenant_path(data_dir, tenant))


def count_facets_in(root: Path) -> int:
    """Facets under the tenant directory ``root``: store directories holding a data file
    (what :meth:`StoreRegistry.exists` calls a facet), without reading any hint."""
    count = 0
    if not root.is_dir():
        return count
    for fanout in os.scandir(root):
        if fanout.is_dir():
            for entry in os.scandir(fanout.path):
                if store_exists(Path(entry.path)):
                    count += 1
    return count
