"""Backups on disk: layout, the manifest and its checks. Blocking; no trio.

Layout of a backup directory (ids never appear in paths: the data directory's hashed layout)::

    <backup>/manifest.jsonl                      written last: a backup without it is partial
    <backup>/tenants/<h>/facets/<hh>/<h>/data.mdb    one compacted LMDB copy per facet
    <backup>/system/data.mdb                     node backups: tenants and hashed keys

``manifest.jsonl`` is JSON lines, so that a node with millions of facets is written and read
in bounded memory::

    {"format": "facetrt-backup", "version": 1, "created": t, "scope": {"kind": "tenant", ...}}
    {"tenant": ..., "agent": ..., "class": ..., "path": "tenants/...", "bytes": n,
     "sha256": hex, "entries": {"data": 2, ...}}                  one line per facet
    {"system": {"path": "system/data.mdb", "bytes": n, "sha256": hex}}   node backups only
    {"end": true, "facets": n}                                    the last line

Each copy is fsynced (file and directory) and verified (``lmdb.verify`` and a read through
LMDB) before its line is written; the manifest is written to a temporary name, fsynced and
renamed, and its directory fsynced. A restore recomputes each checksum before using a copy.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Final

from .._errors import BadRequestError, ConflictError, StorageError
from .._ids import FacetAddress, validate_tenant_id
from ..storage import fsync_dir
from ._environment import named_dbs, open_readonly, verify_store
from ._files import DATA_FILE, fsync_file, sha256_file

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator
    from pathlib import Path

MANIFEST: Final = "manifest.jsonl"
FORMAT: Final = "facetrt-backup"
VERSION: Final = 1
SYSTEM_PATH: Final = "system/data.mdb"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupEntry:
    """One copied store: where it is in the backup, its size and checksum."""

    address: FacetAddress
    class_name: str | None
    path: str
    size_bytes: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {
            "tenant": self.address.tenant_id,
            "agent": self.address.agent_id,
            "class": self.class_name,
            "path": self.path,
            "bytes": self.size_bytes,
            "sha256": self.sha256,
        }


def entry_path(address: FacetAddress) -> str:
    return str(address.relative_path() / DATA_FILE)


def prepare_target(directory: Path) -> None:
    """Create the backup directory; refuse one that exists and is not empty.

    Raises:
        ConflictError: ``directory`` exists and holds something.
    """
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConflictError(f"backup target {str(directory)!r} exists and is not empty")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fsync_dir(directory.parent)


def seal_copy(directory: Path, relative: str) -> tuple[int, str, str | None]:
    """Fsync, verify and checksum the copy ``directory/relative``: (bytes, sha256, class).

    Raises:
        StorageError: the copy does not verify.
    """
    path = directory / relative
    fsync_file(path)
    # The copy's directory and the one above it here; the few above those once per backup.
    fsync_dir(path.parent)
    fsync_dir(path.parent.parent)
    summary = verify_store(path.parent)
    return path.stat().st_size, sha256_file(path), summary.class_name


class ManifestWriter:
    """Writes ``manifest.jsonl`` line by line under a temporary name; :meth:`commit` seals it."""

    def __init__(self, directory: Path, scope: dict[str, object]) -> None:
        self._directory = directory
        self._partial = directory / (MANIFEST + ".partial")
        self._file: IO[bytes] = self._partial.open("xb")
        self.facets = 0
        header = {"format": FORMAT, "version": VERSION, "created": time.time(), "scope": scope}
        self._line(header)

    def _line(self, document: dict[str, object]) -> None:
        self._file.write(json.dumps(document, separators=(",", ":")).encode() + b"\n")

    def add(self, entry: BackupEntry) -> None:
        self._line(entry.to_json())
        self.facets += 1

    def add_system(self, size_bytes: int, sha256: str) -> None:
        self._line({"system": {"path": SYSTEM_PATH, "bytes": size_bytes, "sha256": sha256}})

    def commit(self) -> None:
        self._line({"end": True, "facets": self.facets})
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self._partial, self._directory / MANIFEST)
        fsync_dir(self._directory)

    def abort(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    scope: dict[str, object]
    created: float
    facets: int
    system: dict[str, object] | None


def read_manifest(directory: Path) -> tuple[Manifest, Generator[BackupEntry, None, None]]:
    """The manifest's header and summary, and an iterator over its facet entries.

    The whole file is checked line by line first (bounded memory: entries are re-read
    lazily), so a truncated or malformed manifest is refused before anything is restored.

    Raises:
        BadRequestError: no manifest, or it is malformed, truncated or names bad paths.
    """
    path = directory / MANIFEST
    if not path.is_file():
        raise BadRequestError(f"{str(directory)!r} is not a backup (no {MANIFEST})")
    header: dict[str, object] | None = None
    system: dict[str, object] | None = None
    count = 0
    ended = False
    for number, document in _documents(path):
        if header is None:
            if document.get("format") != FORMAT or document.get("version") != VERSION:
                raise BadRequestError(f"{MANIFEST}: line 1 is not a {FORMAT} header")
            header = document
        elif ended:
            raise BadRequestError(f"{MANIFEST}: line {number} after the end line")
        elif "end" in document:
            ended = document.get("facets") == count
            if not ended:
                raise BadRequestError(f"{MANIFEST}: the end line does not count {count} facets")
        elif "system" in document:
            system = _system_entry(document["system"], number)
        else:
            _entry(document, number)
            count += 1
    if header is None or not ended:
        raise BadRequestError(f"{MANIFEST} is truncated (no end line): the backup is partial")
    scope = header.get("scope")
    created = header.get("created")
    manifest = Manifest(
        scope=scope if isinstance(scope, dict) else {},
        created=float(created) if isinstance(created, (int, float)) else 0.0,
        facets=count,
        system=system,
    )
    entries = (
        _entry(document, number)
        for number, document in _documents(path)
        if number > 1 and not {"end", "system"} & set(document)
    )
    return manifest, entries


def _documents(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                document = json.loads(line)
            except ValueError:
                raise BadRequestError(f"{MANIFEST}: line {number} is not JSON") from None
            if not isinstance(document, dict):
                raise BadRequestError(f"{MANIFEST}: line {number} is not an object")
            yield number, document


def _entry(document: dict[str, object], number: int) -> BackupEntry:
    try:
        address = FacetAddress(document["tenant"], document["agent"])  # type: ignore[arg-type]  # validated by FacetAddress
        size, digest, cls = document["bytes"], document["sha256"], document.get("class")
    except (KeyError, ValueError) as exc:
        raise BadRequestError(f"{MANIFEST}: line {number} is not a facet entry: {exc}") from None
    # Paths come from the ids, never from the file: a crafted manifest cannot point outside.
    if document.get("path") != entry_path(address):
        raise BadRequestError(f"{MANIFEST}: line {number} has a path that does not match its ids")
    if not isinstance(size, int) or not isinstance(digest, str) or len(digest) != 64:
        raise BadRequestError(f"{MANIFEST}: line {number} has a bad size or checksum")
    return BackupEntry(
        address=address,
        class_name=cls if isinstance(cls, str) else None,
        path=entry_path(address),
        size_bytes=size,
        sha256=digest,
    )


def _system_entry(value: object, number: int) -> dict[str, object]:
    if not isinstance(value, dict) or value.get("path") != SYSTEM_PATH:
        raise BadRequestError(f"{MANIFEST}: line {number} is not a system entry")
    return value


def check_system_copy(directory: Path, system: dict[str, object]) -> None:
    """Check the system store's copy like a facet's (size, checksum, ``lmdb.verify``), and
    that it is one: a ``tenants`` and a ``keys`` db whose records have the system store's
    shape (the daemon reads every key record when it opens the store).

    Raises:
        BadRequestError: missing, another size or checksum, damaged, or not a system store.
    """
    path = directory / SYSTEM_PATH
    size, digest = system.get("bytes"), system.get("sha256")
    try:
        actual = path.stat().st_size
    except OSError:
        raise BadRequestError(f"the backup's {SYSTEM_PATH} is missing") from None
    if actual != size or sha256_file(path) != digest:
        raise BadRequestError(f"checksum mismatch in {SYSTEM_PATH} (corrupted)")
    try:
        verify_store(path.parent)
        _check_system_records(path.parent)
    except StorageError as exc:
        raise BadRequestError(f"the backup's {SYSTEM_PATH}: {exc.message}") from None


def _check_system_records(directory: Path) -> None:
    env = open_readonly(directory)
    try:
        with env.begin() as txn:
            dbs = named_dbs(env, txn)
            if not {b"tenants", b"keys"} <= set(dbs):
                raise StorageError("not a system store (no tenants and keys dbs)")
            for key, raw in txn.cursor(dbs[b"tenants"]):
                if not (_is_tenant_id(key) and isinstance(_json(raw), dict)):
                    raise StorageError(f"malformed tenant record {key[:64]!r}")
            for key, raw in txn.cursor(dbs[b"keys"]):
                if not _is_key_record(_json(raw)):
                    raise StorageError(f"malformed key record {key[:64]!r}")
    finally:
        env.close()


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _is_tenant_id(key: bytes) -> bool:
    try:
        validate_tenant_id(key.decode())
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _is_key_record(record: object) -> bool:
    if not isinstance(record, dict):
        return False
    digest, tenant, revoked = record.get("hash"), record.get("tenant"), record.get("revoked")
    return (
        isinstance(digest, str)
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
        and (tenant is None or isinstance(tenant, str))
        and (revoked is None or isinstance(revoked, (int, float)))
        and isinstance(record.get("created"), (int, float))
    )


def check_copy(directory: Path, entry: BackupEntry) -> None:
    """Recompute the checksum of ``entry``'s copy and verify it as an LMDB environment.

    Raises:
        BadRequestError: the file is missing, has another size or checksum, or is damaged.
    """
    path = directory / entry.path
    try:
        size = path.stat().st_size
    except OSError:
        raise BadRequestError(
            f"backup of {str(entry.address)!r}: {entry.path} is missing"
        ) from None
    if size != entry.size_bytes or sha256_file(path) != entry.sha256:
        raise BadRequestError(
            f"backup of {str(entry.address)!r}: checksum mismatch in {entry.path} (corrupted)"
        )
    try:
        verify_store(path.parent)
    except StorageError as exc:
        raise BadRequestError(f"backup of {str(entry.address)!r}: {exc.message}") from None
