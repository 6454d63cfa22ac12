"""Facet exports as JSON lines: the format, the writer and the bounded, validating reader.

Format (UTF-8, one JSON object per line)::

    {"format": "facetrt-export", "version": 1, "tenant": ..., "agent": ..., "class": ...,
     "exported": <unix seconds>, "entries": {"data": 2, "idem": 0, "meta": 4}}
    {"db": "data", "key": "count", "value": 3}
    {"db": "data", "key": "blob", "value": {"$bytes": "AAEC"}}
    {"db": "idem", "key": "k1", "raw": {"$bytes": "lJMB..."}}
    {"end": true, "entries": 7}

The header comes first and the end line last (an import refuses input without it: a truncated
export is never installed); then every entry of every named db of the store, db by db in name
order, keys in LMDB order. Keys are strings (UTF-8) or ``{"$bytes": base64}`` markers (the
HTTP gateway's convention, ``facetrt._json``). A value is ``"value"`` (the stored msgpack value
as JSON) when that JSON encodes back to exactly the stored bytes, else ``"raw"`` (the stored
bytes, base64). So an import rebuilds every db byte for byte: export then import equals the
original. The meta db's tenant and agent are rewritten to the facet imported into.

Reading is bounded: a line is at most :data:`LINE_BYTES_MAX`, a value at most the runtime's
``value_bytes_max`` (data db) and keys at most 511 bytes; any violation names the line and
nothing is installed.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any, Final

import lmdb
import msgpack

from .._errors import BadRequestError, StorageError
from .._json import BYTES_MARKER, dump_json, from_json, to_json
from .._values import check_value
from ..storage import open_environment
from ._environment import DB_NAME, DBS_MAX, named_dbs, open_readonly

if TYPE_CHECKING:
    from collections.abc import Generator
    from pathlib import Path

    from .._ids import FacetAddress

FORMAT: Final = "facetrt-export"
VERSION: Final = 1
KEY_BYTES_MAX: Final = 511
LINE_OVERHEAD_BYTES: Final = 64 * 1024
WRITE_BATCH_BYTES: Final = 4 * 1024 * 1024


def line_bytes_max(value_bytes_max: int) -> int:
    """Longest line accepted: base64 (4/3) of the largest value, JSON escapes (x2) aside."""
    return 3 * value_bytes_max + LINE_OVERHEAD_BYTES


# -- writing -------------------------------------------------------------------------------


def export_lines(directory: Path, address: FacetAddress) -> Generator[bytes, None, None]:
    """The export of the store copied into ``directory``, line by line (with newlines).

    Holds one read transaction of the copy until exhausted (the copy is private: nothing
    waits on it).
    """
    env = open_readonly(directory)
    try:
        with env.begin() as txn:
            dbs = named_dbs(env, txn)
            entries = {name.decode(): int(txn.stat(db)["entries"]) for name, db in dbs.items()}
            meta = dbs.get(b"meta")
            raw_class = None if meta is None else txn.get(b"class", db=meta)
            header = {
                "format": FORMAT,
                "version": VERSION,
                "tenant": address.tenant_id,
                "agent": address.agent_id,
                "class": None if raw_class is None else msgpack.unpackb(raw_class),
                "exported": time.time(),
                "entries": entries,
            }
            yield dump_json(header) + b"\n"
            count = 0
            for name, db in dbs.items():
                for key, raw in txn.cursor(db):
                    yield _entry_line(name.decode(), key, raw)
                    count += 1
            yield dump_json({"end": True, "entries": count}) + b"\n"
    finally:
        env.close()


def _entry_line(db: str, key: bytes, raw: bytes) -> bytes:
    try:
        json_key: object = key.decode()
    except UnicodeDecodeError:
        json_key = to_json(key)
    document: dict[str, object] = {"db": db, "key": json_key}
    value = _as_json(raw)
    if value is _RAW:
        document["raw"] = to_json(raw)
    else:
        document["value"] = value
    return dump_json(document) + b"\n"


_RAW: Final = object()


def _as_json(raw: bytes) -> object:
    """The stored msgpack value as JSON data if that encodes back to ``raw`` exactly."""
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        document = to_json(value)
        dump_json(document)  # NaN and infinities cannot travel
        again = msgpack.packb(from_json(document), use_bin_type=True)
    except Exception:  # noqa: BLE001 - msgpack raises many types; any failure means "raw"
        return _RAW
    return document if again == raw else _RAW


# -- reading -------------------------------------------------------------------------------


class LineSplitter:
    """Splits a byte stream into lines of at most ``line_bytes_max`` bytes (bounded buffer)."""

    def __init__(self, line_bytes_max: int) -> None:
        self._max = line_bytes_max
        self._buffer = bytearray()
        self.lines = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *complete, rest = bytes(self._buffer).split(b"\n")
        self._buffer = bytearray(rest)
        lines = [line for line in complete if line.strip()]
        for line in complete:
            self.lines += 1
            if len(line) > self._max:
                raise BadRequestError(f"line {self.lines} is over {self._max} bytes")
        if len(self._buffer) > self._max:
            raise BadRequestError(f"line {self.lines + 1} is over {self._max} bytes")
        return lines

    def finish(self) -> list[bytes]:
        rest, self._buffer = bytes(self._buffer), bytearray()
        if rest.strip():
            self.lines += 1
            return [rest]
        return []


class ImportBuilder:
    """Builds a store from export lines in ``directory`` (a private scratch directory).

    Blocking: each :meth:`write` is one LMDB write transaction, run on a writer thread. The
    scratch environment is not durable while it fills; :meth:`finish` syncs it once.
    """

    def __init__(self, directory: Path, *, map_size_bytes: int, value_bytes_max: int) -> None:
        self._directory = directory
        # Stored records may be a little larger than a value (an idempotency record wraps one).
        self._value_bytes_max = value_bytes_max + LINE_OVERHEAD_BYTES
        # A scratch store, synced once in finish().
        self._env = open_environment(
            directory,
            map_size_bytes=map_size_bytes,
            max_dbs=DBS_MAX,
            max_readers=1,
            durable=False,
            max_spare_txns=0,
        )
        self._dbs: dict[str, Any] = {}
        self._header: dict[str, object] | None = None
        self._ended = False
        self.entries = 0

    def write(self, lines: list[bytes], first_line: int) -> None:
        """Validate and store ``lines`` (numbered from ``first_line``) in one transaction.

        Raises:
            BadRequestError: a line is malformed (its number in the message); nothing of
                this batch is stored.
            StorageError: the scratch store is full (``map_size_bytes_max``).
        """
        try:
            with self._env.begin(write=True) as txn:
                for number, line in enumerate(lines, start=first_line):
                    self._write_line(txn, number, line)
        except lmdb.MapFullError as exc:
            raise BadRequestError("the export is larger than a facet store may grow") from exc
        except lmdb.Error as exc:
            raise StorageError(f"cannot build the imported store: {exc}") from exc

    def _write_line(self, txn: lmdb.Transaction[bytes], number: int, line: bytes) -> None:
        try:
            document = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise BadRequestError(f"line {number} is not JSON: {exc}") from None
        if self._header is None:
            self._header = _check_header(document, number)
            return
        if self._ended:
            raise BadRequestError(f"line {number} follows the end line")
        if isinstance(document, dict) and "end" in document:
            if document != {"end": True, "entries": self.entries}:
                raise BadRequestError(f"line {number}: the end line does not count {self.entries}")
            self._ended = True
            return
        if not isinstance(document, dict) or not {"db", "key"} <= set(document):
            raise BadRequestError(f'line {number}: expected {{"db", "key", "value" or "raw"}}')
        db = self._db(txn, document["db"], number)
        key = _key(document["key"], number)
        try:
            if set(document) == {"db", "key", "value"}:
                value = from_json(document["value"])
                check_value(value)
                raw: object = msgpack.packb(value, use_bin_type=True)
            elif set(document) == {"db", "key", "raw"} and isinstance(document["raw"], dict):
                raw = from_json(document["raw"])
            else:
                raise BadRequestError('give exactly one of "value" and "raw"')
        except BadRequestError as exc:
            raise BadRequestError(f"line {number}: {exc.message}") from None
        if not isinstance(raw, bytes) or len(raw) > self._value_bytes_max:
            raise BadRequestError(f"line {number}: the value is over {self._value_bytes_max} bytes")
        txn.put(key, raw, db=db)
        self.entries += 1

    def _db(self, txn: lmdb.Transaction[bytes], name: object, number: int) -> Any:
        if not isinstance(name, str) or DB_NAME.fullmatch(name.encode()) is None:
            raise BadRequestError(f"line {number}: bad db name {name!r}")
        db = self._dbs.get(name)
        if db is None:
            if len(self._dbs) >= DBS_MAX - 1:
                raise BadRequestError(f"line {number}: more than {DBS_MAX - 1} dbs")
            db = self._dbs[name] = self._env.open_db(name.encode(), txn=txn)
        return db

    def finish(self, address: FacetAddress) -> None:
        """Check the facet is complete, set its identity to ``address`` and sync it.

        Raises:
            BadRequestError: no header, or no class binding in the meta db.
        """
        if self._header is None:
            raise BadRequestError("the import is empty: no header line")
        if not self._ended:
            raise BadRequestError("the import is truncated: no end line")
        with self._env.begin(write=True) as txn:
            meta = self._db(txn, "meta", 0)
            if txn.get(b"class", db=meta) is None:
                raise BadRequestError("the export binds no class (no meta entry 'class')")
            txn.put(b"tenant", msgpack.packb(address.tenant_id), db=meta)
            txn.put(b"agent", msgpack.packb(address.agent_id), db=meta)
        self._env.sync(True)

    def close(self) -> None:
        self._env.close()


def _check_header(document: object, number: int) -> dict[str, object]:
    if (
        not isinstance(document, dict)
        or document.get("format") != FORMAT
        or document.get("version") != VERSION
    ):
        raise BadRequestError(
            f"line {number}: the first line must be a {FORMAT} version {VERSION} header"
        )
    return document


def _key(value: object, number: int) -> bytes:
    if isinstance(value, str):
        try:
            key = value.encode()
        except UnicodeEncodeError:
            raise BadRequestError(f"line {number}: the key holds a lone surrogate") from None
    elif isinstance(value, dict) and set(value) == {BYTES_MARKER}:
        try:
            key = base64.b64decode(str(value[BYTES_MARKER]), validate=True)
        except ValueError:
            raise BadRequestError(f"line {number}: bad base64 in the key") from None
    else:
        raise BadRequestError(f"line {number}: a key is a string or a $bytes marker")
    if not 0 < len(key) <= KEY_BYTES_MAX:
        raise BadRequestError(f"line {number}: keys are 1 to {KEY_BYTES_MAX} bytes")
    return key
