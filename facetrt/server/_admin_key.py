"""The admin key file: created on first start, replaced on request, recovered after a crash.

Its own module because three callers share it: the daemon's start (:func:`ensure_admin_key`),
``facetrt restore --system`` (:func:`refresh_admin_key`) and ``facetrt key rotate-admin``,
directly on the data directory or through the daemon's admin route (:func:`rotate_admin_key`).

A new key is written so that no crash leaves the node with a stored admin key that no file
holds (the operator would be locked out of the admin API, with no admin key to create another
through it):

  1. generate the key (nothing stored yet)
  2. write it to <file>.tmp (created fresh, mode 0600), fsync it and its directory
  3. store its hash in the system store (a durable commit): from here it authenticates
  4. rename <file>.tmp to <file>, fsync the directory

A crash before 3 leaves at most a temporary file whose key authenticates nowhere: it is
removed or overwritten. A crash after 3 (or a lost rename) leaves the stored key in the
temporary file: the next start (or restore) moves it into place, over whatever <file> holds,
since a stored key in the temporary file is always the newest write's. The temporary file was
named with_suffix(".tmp") ("admin.tmp") before this order was used; a key left there is
recovered the same way.

A rotation runs the four steps, then revokes every other active admin key in one commit
(step 5). Until step 5 commits, the old keys stay valid: a crash in between leaves two valid
admin keys, the file holding the new one (once the next start has finished step 4); running
the rotation again revokes the old one. No order revokes first: a crash there would leave no
valid admin key in any file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .._errors import StorageError, UnauthorizedError
from ..storage import fsync_dir, write_private_file

if TYPE_CHECKING:
    from pathlib import Path

    from ..storage import SystemStore

logger = logging.getLogger(__name__)

ADMIN_KEY_FILE: Final = "admin.key"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminKeyRotation:
    """What :func:`rotate_admin_key` did (never the key itself)."""

    path: Path  # the file now holding the new admin key
    key_id: str  # the new admin key's id
    revoked_key_ids: tuple[str, ...]  # the admin keys that stopped working


def ensure_admin_key(system: SystemStore, data_dir: Path) -> Path:
    """Create the admin key on first start, in ``<data dir>/admin.key`` (mode 0600), or
    finish a write of it that a crash interrupted (see the module docstring)."""
    path = data_dir / ADMIN_KEY_FILE
    if not any(record.is_admin and record.revoked is None for record in system.list_keys()):
        _write_admin_key(system, path)
    elif not _recover_admin_key(system, path) and not _holds_admin_key(system, path):
        # An operator may keep the key elsewhere (the CLI's --admin-key-file): not an error.
        logger.warning(
            "admin key file %s is missing or holds no active admin key; the admin API needs "
            "one (the CLI reads --admin-key-file); `facetrt key rotate-admin` with the daemon "
            "stopped writes a new one",
            path,
        )
    return path


def refresh_admin_key(system: SystemStore, path: Path) -> bool:
    """Make the admin key in ``path`` valid in ``system``: after an offline restore of the
    system store, the file holds the replaced store's key (backups hold only hashes).

    Returns:
        whether ``path`` now holds another key: a new admin key, or one that an interrupted
        earlier write left in the temporary file and that is an active admin key of
        ``system``. The restored store's other admin keys stay as they were.
    """
    if _recover_admin_key(system, path):
        return True
    if _holds_admin_key(system, path):
        return False
    _write_admin_key(system, path)
    return True


def rotate_admin_key(system: SystemStore, path: Path) -> AdminKeyRotation:
    """Write a new admin key to ``path`` (mode 0600), then revoke every other admin key.

    The new key is in ``path`` and stored before any old key is revoked (steps 1-5 of the
    module docstring). Two rotations of one ``path`` must not run at once (they share the
    temporary file): the caller serialises them (the data directory's lock, or the daemon's
    rotation lock). The key is never logged or returned.

    Raises:
        StorageError: the file could not be written or the system store failed. The old
            keys are still valid; the file holds the old key, or the new one if only the
            revocation failed (both are then valid: run the rotation again).
    """
    try:
        key_id = _write_admin_key(system, path)
    except OSError as exc:
        raise StorageError(f"cannot write the admin key file {str(path)!r}: {exc}") from exc
    revoked = tuple(system.revoke_other_admin_keys(key_id))
    logger.info(
        "rotated the admin key to key id %s; revoked admin keys: %s",
        key_id,
        ", ".join(revoked) or "none",
    )
    return AdminKeyRotation(path=path, key_id=key_id, revoked_key_ids=revoked)


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _holds_admin_key(system: SystemStore, path: Path) -> bool:
    """Whether the file ``path`` holds an active admin key of ``system``."""
    try:
        # A torn or foreign file is not valid UTF-8 perhaps: it then simply does not match.
        return system.authenticate(path.read_bytes().decode(errors="replace").strip()).is_admin
    except (OSError, UnauthorizedError):
        return False


def _recover_admin_key(system: SystemStore, path: Path) -> bool:
    """Move an active admin key that an interrupted write left in a temporary file into
    ``path`` (durably, mode 0600); return whether there was one. A temporary file of ours
    holding anything else is removed: that key was never stored.

    ``path`` may hold an active admin key too: a rotation stopped between storing its key
    and renaming the file. The new key replaces it in the file; the old one stays valid
    until the rotation is run again (a start never revokes keys)."""
    candidates = (_temporary(path), path.with_suffix(".tmp"))  # the second: its older name
    found = next((t for t in candidates if t != path and _holds_admin_key(system, t)), None)
    if found is not None:
        replaced = _holds_admin_key(system, path)
        os.chmod(found, 0o600)
        os.replace(found, path)
        fsync_dir(path.parent)
        logger.warning("moved the admin key an interrupted write left in %s to %s", found, path)
        if replaced:
            logger.warning(
                "the admin key that %s held before is still valid (an interrupted rotation): "
                "run `facetrt key rotate-admin` to revoke it",
                path,
            )
    _temporary(path).unlink(missing_ok=True)
    return found is not None


def _write_admin_key(system: SystemStore, path: Path) -> str:
    """Write a new admin key to ``path`` and store it (steps 1-4); return its key id."""
    new = system.new_key(None)
    temporary = _temporary(path)
    # Its name too is durable before the key is stored: a stored key is always in a file.
    write_private_file(temporary, new.key.encode() + b"\n")
    system.store_key(new)
    os.replace(temporary, path)
    fsync_dir(path.parent)
    logger.info("created the admin key %s in %s (mode 0600)", new.key_id, path)
    return new.key_id
