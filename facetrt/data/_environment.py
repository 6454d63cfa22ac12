"""Reading and checking a copied store: read-only opens, generic db enumeration, verification.

A store's named dbs are enumerated from the environment's main db (where LMDB keeps their
names) rather than from a fixed list, so copies, exports and verification carry every db a
store has, including ones added later (the timers' db).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import lmdb
import lmdb.verify
import msgpack

from .._errors import BadRequestError, StorageError
from ..runtime._timer_record import parse_record
from ..storage import IDEM_DB, META_DB, TIMERS_DB, open_environment
from ..storage._store import open_readonly as open_store_readonly

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

DBS_MAX: Final = 16
DB_NAME: Final = re.compile(rb"[a-z][a-z0-9_]{0,31}")

# py-lmdb's offline verifier is untyped; give it the type its docstring documents.
_verify_file: Callable[[str], list[str]] = lmdb.verify.verify


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSummary:
    """What a verified copy holds: entries per named db and its identity from the meta db."""

    entries: dict[str, int]
    class_name: str | None
    tenant: str | None
    agent: str | None


def open_readonly(directory: Path) -> lmdb.Environment:
    """Open a copied store read-only without a lock file (nothing else uses a copy)."""
    return open_store_readonly(directory, max_dbs=DBS_MAX)


def named_dbs(env: lmdb.Environment, txn: lmdb.Transaction[bytes]) -> dict[bytes, Any]:
    """Every named db of ``env`` (name -> handle), in name order."""
    names = [key for key, _ in txn.cursor()]
    bad = [name for name in names if DB_NAME.fullmatch(name) is None]
    if bad or len(names) > DBS_MAX:
        raise StorageError(f"unexpected entries in the main db: {bad[:3]!r} ({len(names)} dbs)")
    return {name: env.open_db(name, txn=txn, create=False) for name in names}


def verify_store(directory: Path) -> StoreSummary:
    """Check the environment in ``directory`` page by page, then read it through LMDB.

    Raises:
        StorageError: ``lmdb.verify`` found a problem or LMDB cannot read the copy.
    """
    try:
        problems = _verify_file(str(directory))
    except (lmdb.verify.VerifyError, OSError) as exc:
        raise StorageError(f"cannot verify {str(directory)!r}: {exc}") from exc
    if problems:
        raise StorageError(f"{str(directory)!r} is damaged: {'; '.join(problems[:3])}")
    try:
        env = open_readonly(directory)
        try:
            with env.begin() as txn:
                dbs = named_dbs(env, txn)
                entries = {name.decode(): int(txn.stat(db)["entries"]) for name, db in dbs.items()}
                meta = dbs.get(b"meta")
                identity = [
                    None if meta is None else txn.get(key, db=meta)
                    for key in (b"class", b"tenant", b"agent")
                ]
        finally:
            env.close()
    except lmdb.Error as exc:
        raise StorageError(f"cannot read {str(directory)!r}: {exc}") from exc
    class_name, tenant, agent = (_text(raw) for raw in identity)
    return StoreSummary(entries=entries, class_name=class_name, tenant=tenant, agent=agent)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerScan:
    """The timers of a store about to be installed: how many, and the earliest scheduled one
    (ms since the epoch; None when none is scheduled), which the node's timer index must know
    before the store becomes visible (decision 0007)."""

    count: int
    earliest_ms: int | None


def scan_timers(directory: Path) -> TimerScan:
    """Read every timer of the store in ``directory`` (a private copy) and check its shape.

    Bounded by the store itself (``timers_per_facet_max`` for stores the runtime wrote); one
    read transaction on a writer thread.

    Raises:
        BadRequestError: a timer's name is not UTF-8 or its record is malformed (an import
            or a backup that was edited): the store must not be installed, since its
            activation would stop on it.
        StorageError: LMDB cannot read the copy.
    """
    count = 0
    earliest: int | None = None
    try:
        env = open_readonly(directory)
        try:
            with env.begin() as txn:
                timers = named_dbs(env, txn).get(TIMERS_DB)
                if timers is None:
                    return TimerScan(count=0, earliest_ms=None)
                for key, raw in txn.cursor(timers):
                    record = parse_record(raw)
                    if record is None or not _is_text(key):
                        raise BadRequestError(f"timer {key[:64]!r} has a malformed record")
                    count += 1
                    if not record.failed and (earliest is None or record.due_ms < earliest):
                        earliest = record.due_ms
        finally:
            env.close()
    except lmdb.Error as exc:
        raise StorageError(f"cannot read the timers of {str(directory)!r}: {exc}") from exc
    return TimerScan(count=count, earliest_ms=earliest)


def check_records(directory: Path) -> None:
    """Check the meta and idempotency records of the store in ``directory`` (a private
    copy) have the shape the activation reads them with.

    The activation decodes them when it opens the store (the class, the expiry of every
    idempotency record) and asserts nothing about a store the runtime wrote itself, so a
    record edited into an import or a backup would raise out of it and stop the runtime.

    Raises:
        BadRequestError: a meta record is not msgpack (or the class not a string), or an
            idempotency record is not ``[expires, method, result]``: nothing is installed.
        StorageError: LMDB cannot read the copy.
    """
    try:
        env = open_readonly(directory)
        try:
            with env.begin() as txn:
                dbs = named_dbs(env, txn)
                meta, idem = dbs.get(META_DB), dbs.get(IDEM_DB)
                for key, raw in [] if meta is None else txn.cursor(meta):
                    value = _unpack(raw)
                    if value is _MALFORMED or (key == b"class" and not isinstance(value, str)):
                        raise BadRequestError(f"meta record {key[:64]!r} is malformed")
                for key, raw in [] if idem is None else txn.cursor(idem):
                    if not _is_idempotency_record(_unpack(raw)):
                        raise BadRequestError(f"idempotency record {key[:64]!r} is malformed")
        finally:
            env.close()
    except lmdb.Error as exc:
        raise StorageError(f"cannot read the records of {str(directory)!r}: {exc}") from exc


_MALFORMED: Final = object()


def _unpack(raw: bytes) -> object:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception:  # noqa: BLE001 - msgpack raises many types; any failure means malformed
        return _MALFORMED


def _is_idempotency_record(record: object) -> bool:
    if not isinstance(record, list) or len(record) != 3:
        return False
    expires, method, result = record
    return (
        isinstance(expires, int | float)
        and not isinstance(expires, bool)
        and isinstance(method, str)
        and isinstance(result, bytes)
        and _unpack(result) is not _MALFORMED
    )


def _is_text(key: bytes) -> bool:
    try:
        key.decode()
    except UnicodeDecodeError:
        return False
    return True


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception:  # noqa: BLE001 - msgpack raises many types; a bad meta value is not a name
        return None
    return value if isinstance(value, str) else None


def set_identity(directory: Path, *, tenant: str, agent: str) -> None:
    """Rewrite the tenant and agent ids in the meta db of the copy in ``directory``.

    Raises:
        BadRequestError: the copy has no meta db or no class binding (not a facet).
    """
    # The map size asked for is a minimum: LMDB keeps the larger one recorded in the copy.
    env = open_environment(
        directory,
        map_size_bytes=1 << 20,
        max_dbs=DBS_MAX,
        max_readers=1,
        create=False,
        max_spare_txns=0,
    )
    try:
        with env.begin(write=True) as txn:
            meta = named_dbs(env, txn).get(b"meta")
            if meta is None or txn.get(b"class", db=meta) is None:
                raise BadRequestError("the copy binds no class: it is not a facet store")
            txn.put(b"tenant", msgpack.packb(tenant), db=meta)
            txn.put(b"agent", msgpack.packb(agent), db=meta)
    finally:
        env.close()
