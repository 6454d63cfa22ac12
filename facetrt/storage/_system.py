"""SystemStore: the node-level LMDB environment holding tenants and hashed keys.

Layout (``<data dir>/system/``, one LMDB environment)::

    db tenants   tenant id (UTF-8)  -> JSON {"created": unix seconds,
                                             "quotas": {name: number} (overrides; optional),
                                             "egress": {policy} (optional; policy/_model.py)}
    db secrets   tenant id, NUL, secret name -> JSON {"hosts": [...], "allow_http": bool,
                                             "nonce": b64, "ciphertext": b64, "created": float}
                 (AES-GCM under the node key; encrypted and decrypted in ``policy/``, never here)
    db keys      key id (ASCII hex) -> JSON {"tenant": str | null (admin), "hash": hex str,
                                             "created": float, "revoked": float | null}

A key is shown once, as ``frt_<key id>_<secret>``: 16 hex digits naming the record, then 43
URL-safe characters (32 random bytes). Only SHA-256 of the secret is stored; the secret has
256 bits of entropy, so a plain hash cannot be brute-forced and needs no salt. Comparison is
constant-time. Revocation is recorded (not deleted) so that it is auditable.

All methods are synchronous and short; writes commit durably (``sync=True``).

Threads: reads run on the event loop; the daemon's writes and backup copies on its writer
threads (an fsync must not stop the loop); LMDB serialises the write transactions.

Storage failures raise :class:`StorageError` (``internal``, retryable): nothing of a failed
write is kept, in LMDB or in memory. After a failed transaction the environment is probed and,
if LMDB has marked it fatal (a failed meta page write makes it refuse every later transaction,
reads included), closed and opened again, so one failed write does not leave the node unable
to read or create tenants and keys until a restart. A reopen must not close the environment
under another thread's transaction or copy: every use holds the store's gate shared, a reopen
holds it exclusively. Writers wait for the gate (they run on writer threads); a read on the
event loop never waits: it reopens only if the gate is free at once, and otherwise fails and
leaves the reopen to the next call.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import lmdb

from .._errors import ConflictError, NotFoundError, StorageError, UnauthorizedError
from .._ids import validate_tenant_id
from ._store import DATA_FILE, fsync_dir, open_environment

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

KEY_PATTERN: Final = re.compile(r"frt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_TENANTS: Final = b"tenants"
_KEYS: Final = b"keys"
_SECRETS: Final = b"secrets"

logger = logging.getLogger(__name__)


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _load(raw: bytes) -> Any:
    return json.loads(raw)


def _secret_key(tenant: str, name: str) -> bytes:
    return tenant.encode() + b"\0" + name.encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    key_id: str
    tenant: str | None  # None: the admin key
    created: float
    revoked: float | None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who a credential belongs to: a tenant, or the operator (admin)."""

    key_id: str
    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewKey:
    """A key made by :meth:`SystemStore.new_key`, not stored yet.

    Storing it is a separate step (:meth:`SystemStore.store_key`), so that a caller can make
    the key itself durable first: the daemon writes ``admin.key.tmp`` before the hash, so no
    crash leaves a valid admin key that no file holds. ``key`` is the secret: it is left out
    of ``repr`` so that logging this object cannot leak it.
    """

    key_id: str
    tenant: str | None  # None: an admin key
    key: str = field(repr=False)  # frt_<key id>_<secret>
    digest: bytes = field(repr=False)  # SHA-256 of the secret: all that is stored


def _new_key(tenant: str | None) -> NewKey:
    """A fresh random key for ``tenant`` (``secrets``: 64-bit id, 256-bit secret)."""
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    digest = hashlib.sha256(secret.encode()).digest()
    return NewKey(key_id=key_id, tenant=tenant, key=f"frt_{key_id}_{secret}", digest=digest)


def _key_record(new: NewKey) -> bytes:
    """The stored record of ``new``: its hash, never the key."""
    return _dump(
        {"tenant": new.tenant, "hash": new.digest.hex(), "created": time.time(), "revoked": None}
    )


class _Gate:
    """Shared use of an environment (transactions, copies) against its exclusive reopen."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._users = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            while self._exclusive:
                self._condition.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._condition:
                self._users -= 1
                if not self._users:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self, *, blocking: bool) -> Iterator[bool]:
        """Yield True while held alone; False (not held) if ``blocking`` is off and it is
        in use. Blocking waits for the current users, which hold it only briefly."""
        with self._condition:
            while blocking and (self._exclusive or self._users):
                self._condition.wait()
            acquired = not (self._exclusive or self._users)
            self._exclusive = self._exclusive or acquired
        if not acquired:
            yield False
            return
        try:
            yield True
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


class SystemStore:
    """Tenants and keys of one data directory. Open one per process (the daemon's).

    Raises:
        StorageError: LMDB could not open it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._gate = _Gate()
        self._broken = False  # a transaction failed: probe (and maybe reopen) before the next
        self._open()

    def _open(self) -> None:
        """Open the environment and load the active keys; on failure nothing is replaced."""
        path = self.path
        try:
            env = open_environment(
                path, map_size_bytes=256 * 1024 * 1024, max_dbs=4, max_readers=64
            )
        except lmdb.Error as exc:
            raise StorageError(f"cannot open the system store at {str(path)!r}: {exc}") from exc
        try:
            tenants = env.open_db(_TENANTS)
            keys = env.open_db(_KEYS)
            secrets_db = env.open_db(_SECRETS)
            # key id -> (hash, tenant) of every active key: authentication is a dict lookup,
            # and a revocation (which goes through this object) takes effect on the very next
            # call.
            active: dict[str, tuple[bytes, str | None]] = {}
            with env.begin() as txn:
                for key_id, raw in txn.cursor(keys):
                    record = _load(raw)
                    if record["revoked"] is None:
                        active[key_id.decode()] = (bytes.fromhex(record["hash"]), record["tenant"])
        except lmdb.Error as exc:
            env.close()
            raise StorageError(f"cannot open the system store at {str(path)!r}: {exc}") from exc
        self._env, self._tenants, self._keys, self._active = env, tenants, keys, active
        self._secrets = secrets_db

    def close(self) -> None:
        self._env.close()

    @contextlib.contextmanager
    def _txn(self, *, write: bool = False) -> Iterator[lmdb.Transaction[bytes]]:
        """A transaction of the store's environment, committed when the block ends.

        Raises:
            StorageError: LMDB failed (the block's writes are not kept), or the store is
                unavailable after an earlier failure.
        """
        if self._broken and write:
            self._recover(blocking=True)
        failure: lmdb.Error | None = None
        with self._gate.shared():
            try:
                with self._env.begin(write=write) as txn:
                    yield txn
            except lmdb.Error as exc:
                failure = exc
        if failure is None:
            return
        if write or self._broken or isinstance(failure, lmdb.PanicError):
            self._broken = True
            with contextlib.suppress(StorageError):
                self._recover(blocking=write)  # if possible now; otherwise the next call
        action = "write" if write else "read"
        raise StorageError(
            f"system store {action} failed in {str(self.path)!r}: {failure}"
        ) from failure

    def _recover(self, *, blocking: bool) -> None:
        """After a failed transaction: reopen the environment if LMDB no longer serves it.

        Raises:
            StorageError: it cannot be opened (the next call tries again).
        """
        with self._gate.exclusive(blocking=blocking) as alone:
            if not alone or not self._broken:
                return  # in use (a reader does not wait), or another thread reopened it
            try:
                with self._env.begin():
                    pass
            except lmdb.Error:
                pass  # fatal (MDB_PANIC), or closed by a failed reopen: open it again
            else:
                self._broken = False
                return
            self._env.close()
            self._open()
            self._broken = False
            logger.warning("reopened the system store at %s after a failed write", self.path)

    def replace_data(self, staged: Path) -> None:
        """Make the LMDB file ``staged`` this store's data, then reopen (blocking).

        For an offline restore only (``facetrt restore --system`` without a daemon): the
        caller owns the data directory and uses this store nowhere else meanwhile, and
        ``staged`` is a verified, fsynced copy on the same filesystem. The rename is the
        atomic step (the store is old or new, never absent); the old lock file goes, since
        LMDB's reader table belongs to the old file (nothing else has it open).

        Raises:
            StorageError: the restored file cannot be opened (it was verified first).
        """
        self._env.close()
        try:
            os.replace(staged, self.path / DATA_FILE)
            (self.path / "lock.mdb").unlink(missing_ok=True)
            fsync_dir(self.path)
        finally:
            self._open()  # the new store, or the old one if the rename failed

    def copy_to(self, directory: Path) -> None:
        """A compacted, consistent copy in ``directory``/data.mdb (for node backups); not
        fsynced here.

        Raises:
            StorageError: the copy failed.
        """
        with self._gate.shared():
            try:
                self._env.copy(str(directory), compact=True)
            except lmdb.Error as exc:
                raise StorageError(f"cannot copy the system store: {exc}") from exc

    # -- tenants ---------------------------------------------------------------------------

    def create_tenant(self, tenant: str) -> None:
        """Raises: AddressError (bad id), ConflictError (exists)."""
        validate_tenant_id(tenant)
        with self._txn(write=True) as txn:
            self._put_new_tenant(txn, tenant)

    def create_tenant_with_key(self, tenant: str) -> tuple[str, str]:
        """Create ``tenant`` and its first key in one transaction; return (key id, the key).

        One commit, so a failure leaves neither (a retry is then a clean second attempt,
        not a ``conflict`` over a tenant created without its key).

        Raises: AddressError (bad id), ConflictError (exists), StorageError.
        """
        validate_tenant_id(tenant)
        new = _new_key(tenant)
        with self._txn(write=True) as txn:
            self._put_new_tenant(txn, tenant)
            txn.put(new.key_id.encode(), _key_record(new), db=self._keys)
        self._active[new.key_id] = (new.digest, tenant)
        return new.key_id, new.key

    def _put_new_tenant(self, txn: lmdb.Transaction[bytes], tenant: str) -> None:
        if txn.get(tenant.encode(), db=self._tenants) is not None:
            raise ConflictError(f"tenant {tenant!r} already exists")
        txn.put(tenant.encode(), _dump({"created": time.time()}), db=self._tenants)

    def tenant_exists(self, tenant: str) -> bool:
        with self._txn() as txn:
            return txn.get(tenant.encode(), db=self._tenants) is not None

    def list_tenants(self) -> list[str]:
        with self._txn() as txn:
            return [key.decode() for key, _ in txn.cursor(self._tenants)]

    def tenant_quotas(self, tenant: str) -> dict[str, object]:
        """The quota overrides stored for ``tenant`` (unvalidated: ``config`` validates).

        Raises: NotFoundError.
        """
        with self._txn() as txn:
            raw = txn.get(tenant.encode(), db=self._tenants)
        if raw is None:
            raise NotFoundError(f"tenant {tenant!r} does not exist")
        quotas = _load(raw).get("quotas", {})
        return dict(quotas) if isinstance(quotas, dict) else {}

    def all_tenant_quotas(self) -> dict[str, dict[str, object]]:
        """Every tenant's stored quota overrides (tenants without any are left out)."""
        found: dict[str, dict[str, object]] = {}
        with self._txn() as txn:
            for key, raw in txn.cursor(self._tenants):
                quotas = _load(raw).get("quotas")
                if isinstance(quotas, dict) and quotas:
                    found[key.decode()] = quotas
        return found

    def set_tenant_quotas(self, tenant: str, quotas: dict[str, object]) -> None:
        """Replace ``tenant``'s quota overrides (empty: none), durably.

        Raises: NotFoundError.
        """
        with self._txn(write=True) as txn:
            raw = txn.get(tenant.encode(), db=self._tenants)
            if raw is None:
                raise NotFoundError(f"tenant {tenant!r} does not exist")
            record = _load(raw)
            if quotas:
                record["quotas"] = quotas
            else:
                record.pop("quotas", None)
            txn.put(tenant.encode(), _dump(record), db=self._tenants)

    def tenant_egress(self, tenant: str) -> dict[str, object] | None:
        """The egress policy stored for ``tenant`` (unvalidated), or None (node default).

        Raises: NotFoundError.
        """
        with self._txn() as txn:
            raw = txn.get(tenant.encode(), db=self._tenants)
        if raw is None:
            raise NotFoundError(f"tenant {tenant!r} does not exist")
        policy = _load(raw).get("egress")
        return dict(policy) if isinstance(policy, dict) else None

    def all_tenant_egress(self) -> dict[str, dict[str, object]]:
        """Every tenant's stored egress policy (tenants on the node default are left out)."""
        found: dict[str, dict[str, object]] = {}
        with self._txn() as txn:
            for key, raw in txn.cursor(self._tenants):
                policy = _load(raw).get("egress")
                if isinstance(policy, dict):
                    found[key.decode()] = policy
        return found

    def set_tenant_egress(self, tenant: str, policy: dict[str, object] | None) -> None:
        """Replace ``tenant``'s egress policy (None: back to the node default), durably.

        Raises: NotFoundError.
        """
        with self._txn(write=True) as txn:
            raw = txn.get(tenant.encode(), db=self._tenants)
            if raw is None:
                raise NotFoundError(f"tenant {tenant!r} does not exist")
            record = _load(raw)
            if policy is None:
                record.pop("egress", None)
            else:
                record["egress"] = policy
            txn.put(tenant.encode(), _dump(record), db=self._tenants)

    # -- secrets (sealed records; see policy/_secrets.py) ------------------------------------

    def put_secret(self, tenant: str, name: str, record: dict[str, object]) -> None:
        """Store (or replace) a sealed secret record of ``tenant``, durably.

        Raises: NotFoundError (no such tenant).
        """
        with self._txn(write=True) as txn:
            if txn.get(tenant.encode(), db=self._tenants) is None:
                raise NotFoundError(f"tenant {tenant!r} does not exist")
            txn.put(_secret_key(tenant, name), _dump(record), db=self._secrets)

    def delete_secret(self, tenant: str, name: str) -> None:
        """Raises: NotFoundError (no such secret)."""
        with self._txn(write=True) as txn:
            if not txn.delete(_secret_key(tenant, name), db=self._secrets):
                raise NotFoundError(f"tenant {tenant!r} has no secret {name!r}")

    def secrets(self, tenant: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """Sealed secret records by (tenant, name): one tenant's, or every tenant's."""
        prefix = b"" if tenant is None else tenant.encode() + b"\0"
        found: dict[tuple[str, str], dict[str, Any]] = {}
        with self._txn() as txn:
            cursor = txn.cursor(self._secrets)
            if not cursor.set_range(prefix):
                return found
            for key, raw in cursor:
                if not key.startswith(prefix):
                    break
                owner, _, name = key.decode().partition("\0")
                found[(owner, name)] = _load(raw)
        return found

    def delete_tenant(self, tenant: str) -> int:
        """Remove the tenant and revoke its keys; return how many keys were revoked.

        Raises: NotFoundError.
        """
        revoked = 0
        now = time.time()
        with self._txn(write=True) as txn:
            if not txn.delete(tenant.encode(), db=self._tenants):
                raise NotFoundError(f"tenant {tenant!r} does not exist")
            # Its secrets go with it: a tenant created later under the name must not get them.
            prefix = tenant.encode() + b"\0"
            cursor = txn.cursor(self._secrets)
            if cursor.set_range(prefix):
                while cursor.key().startswith(prefix):
                    if not cursor.delete():
                        break
            for key_id, raw in list(txn.cursor(self._keys)):
                record = _load(raw)
                if record["tenant"] == tenant and record["revoked"] is None:
                    record["revoked"] = now
                    txn.put(key_id, _dump(record), db=self._keys)
                    revoked += 1
        for active_id, (_, owner) in list(self._active.items()):
            if owner == tenant:
                del self._active[active_id]
        return revoked

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, tenant: str | None) -> tuple[str, str]:
        """Create a key for ``tenant`` (None: an admin key); return (key id, the key).

        The key itself is returned only here and never stored.

        Raises: NotFoundError (no such tenant), ConflictError (its random 64-bit id is taken
        already: as good as never; retry).
        """
        new = self.new_key(tenant)
        self.store_key(new)
        return new.key_id, new.key

    @staticmethod
    def new_key(tenant: str | None) -> NewKey:
        """A fresh random key for ``tenant`` (None: an admin key), not stored: nothing
        authenticates with it until :meth:`store_key`."""
        return _new_key(tenant)

    def store_key(self, new: NewKey) -> None:
        """Store the hash of ``new`` durably; from then on the key authenticates.

        Raises: NotFoundError (no such tenant), ConflictError (its key id is already stored:
        storing a key twice would reset a revocation).
        """
        with self._txn(write=True) as txn:
            if new.tenant is not None and txn.get(new.tenant.encode(), db=self._tenants) is None:
                raise NotFoundError(f"tenant {new.tenant!r} does not exist")
            if not txn.put(new.key_id.encode(), _key_record(new), overwrite=False, db=self._keys):
                raise ConflictError(f"a key with id {new.key_id!r} is already stored")
        self._active[new.key_id] = (new.digest, new.tenant)

    def revoke_key(self, key_id: str, *, keep_an_admin_key: bool = False) -> None:
        """Revoke ``key_id``; with ``keep_an_admin_key``, never the last active admin key
        (checked in the same write transaction, so two revocations cannot both pass).

        Raises: NotFoundError (unknown or already revoked key id), ConflictError (the last
        admin key, with ``keep_an_admin_key``).
        """
        with self._txn(write=True) as txn:
            raw = txn.get(key_id.encode(), db=self._keys)
            if raw is None:
                raise NotFoundError(f"no key with id {key_id!r}")
            record = _load(raw)
            if record["revoked"] is not None:
                raise NotFoundError(f"key {key_id!r} is already revoked")
            if keep_an_admin_key and record["tenant"] is None:
                others = (
                    other
                    for other_id, other_raw in txn.cursor(self._keys)
                    if other_id != key_id.encode()
                    for other in (_load(other_raw),)
                )
                if not any(o["tenant"] is None and o["revoked"] is None for o in others):
                    raise ConflictError(
                        "refusing to revoke the last admin key; replace it with "
                        "`facetrt key rotate-admin` instead"
                    )
            record["revoked"] = time.time()
            txn.put(key_id.encode(), _dump(record), db=self._keys)
        self._active.pop(key_id, None)

    def revoke_other_admin_keys(self, keep: str) -> list[str]:
        """Revoke every active admin key but ``keep``, in one durable commit; return the ids
        revoked (sorted). Used to rotate the admin key once its successor is stored.

        ``keep`` is checked to be an active admin key in the same write transaction, so this
        never leaves the node without one, whatever ran between storing it and this call.

        Raises: NotFoundError (``keep`` is not an active admin key; nothing is revoked).
        """
        revoked: list[str] = []
        now = time.time()
        with self._txn(write=True) as txn:
            raw = txn.get(keep.encode(), db=self._keys)
            kept = None if raw is None else _load(raw)
            if kept is None or kept["tenant"] is not None or kept["revoked"] is not None:
                raise NotFoundError(f"no active admin key with id {keep!r}")
            for key_id, other_raw in list(txn.cursor(self._keys)):
                record = _load(other_raw)
                if (
                    record["tenant"] is None
                    and record["revoked"] is None
                    and key_id != keep.encode()
                ):
                    record["revoked"] = now
                    txn.put(key_id, _dump(record), db=self._keys)
                    revoked.append(key_id.decode())
        for revoked_id in revoked:
            self._active.pop(revoked_id, None)
        return revoked

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        with self._txn() as txn:
            records = [(key_id.decode(), _load(raw)) for key_id, raw in txn.cursor(self._keys)]
        return [
            KeyRecord(
                key_id=key_id,
                tenant=record["tenant"],
                created=record["created"],
                revoked=record["revoked"],
            )
            for key_id, record in records
            if tenant is None or record["tenant"] == tenant
        ]

    def authenticate(self, key: object) -> Principal:
        """The principal a key belongs to.

        Raises:
            UnauthorizedError: malformed, unknown, revoked or wrong key (one message for all,
                so a caller learns nothing about which).
        """
        match = KEY_PATTERN.fullmatch(key) if isinstance(key, str) else None
        entry = self._active.get(match.group(1)) if match else None
        if match is None or entry is None:
            raise UnauthorizedError("invalid or revoked key")
        digest = hashlib.sha256(match.group(2).encode()).digest()
        if not hmac.compare_digest(digest, entry[0]):
            raise UnauthorizedError("invalid or revoked key")
        return Principal(key_id=match.group(1), tenant=entry[1])

    def is_active(self, principal: Principal) -> bool:
        """Whether the key is still valid (checked on every call: revocation is immediate)."""
        return principal.key_id in self._active
