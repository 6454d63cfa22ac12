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
from typing import TYPE_CHECKING, Final

from .._errors import ConfigError, StorageError
from .._ids import FacetAddress
from ._store import FacetStore, StoreHooks, store_exists

if TYPE_CHECKING:
    from pathlib import Path


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


def _write_id_hint(path: Path, address: FacetAddress) -> None:
    """Record the ids in the store directory, so listings need not open LMDB.

    A hint, not the truth (the store's meta db is): written without fsync and rewritten on
    every open, so a copy lost in a power failure comes back on the next activation.
    """
    hint = path / ID_HINT_FILE
    data = json.dumps({"tenant": address.tenant_id, "agent": address.agent_id}).encode()
    try:
        if hint.read_bytes() == data:
            return
    except OSError:
        pass
    # Written in place (no temporary file and rename: one inode less per new facet); a torn
    # hint reads as garbage, is ignored by listings and rewritten on the next open.
    hint.write_bytes(data)


def _read_id_hint(path: Path) -> str | None:
    try:
        agent = json.loads((path / ID_HINT_FILE).read_bytes())["agent"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return agent if isinstance(agent, str) else None


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

    @property
    def has_hooks(self) -> bool:
        """Whether fault or delay injection is installed (tests)."""
        return self._hooks is not None and self._hooks.before_commit is not None

    def path_of(self, address: FacetAddress) -> Path:
        return self.data_dir / address.relative_path()

    def exists(self, address: FacetAddress) -> bool:
        return store_exists(self.path_of(address))

    def open(self, address: FacetAddress) -> FacetStore:
        """Open (creating if needed) the store of ``address``. Blocking: call off the loop.

        Raises:
            StorageError: LMDB could not open it.
        """
        path = self.path_of(address)
        assert path not in self._open, f"store {path} opened twice"
        store = FacetStore(
            path,
            map_size_bytes=self._map_size_bytes,
            map_size_bytes_max=self._map_size_bytes_max,
            hooks=self._hooks,
        )
        try:
            _write_id_hint(path, address)
        except OSError as exc:
            store.close()
            raise StorageError(f"cannot write the id hint of {str(path)!r}: {exc}") from exc
        self._open[path] = store
        return store

    def list_facets(
        self, tenant: str, *, start_after: str | None = None, limit: int = 100
    ) -> list[tuple[str, str]]:
        """Facets of ``tenant`` as (cursor, agent id), in cursor order, without opening them.

        The cursor is the facet's directory name (a hash); pass the last one as
        ``start_after`` for the next page. Reads each facet's ``facet.id`` hint file.
        """
        root = self.data_dir / FacetAddress(tenant, "x").relative_path().parent.parent
        found: list[tuple[str, str]] = []
        if not root.is_dir():
            return found
        for fanout in sorted(entry.name for entry in os.scandir(root) if entry.is_dir()):
            if start_after is not None and fanout < start_after[:2]:
                continue
            for name in sorted(entry.name for entry in os.scandir(root / fanout)):
                if start_after is not None and name <= start_after:
                    continue
                agent = _read_id_hint(root / fanout / name)
                if agent is not None and store_exists(root / fanout / name):
                    found.append((name, agent))
                    if len(found) >= limit:
                        return found
        return found

    def close(self, store: FacetStore) -> None:
        removed = self._open.pop(store.path, None)
        assert removed is store, f"store {store.path} closed but not open"
        store.close()

    def open_count(self) -> int:
        return len(self._open)
