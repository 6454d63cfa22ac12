"""Durable file steps of data operations: scratch directories, fsync, checksums, swaps.

Every replacement of a facet's store is a rename on one filesystem, so a crash leaves either
the old store or the new one, never a mixture:

- a new store is built in ``<data dir>/scratch/<random>/`` (never inside ``tenants/``, so
  listings and activations cannot see it half-written), fsynced, verified, then renamed into
  place (:func:`install_store`);
- a store is deleted by renaming its directory into ``scratch/`` (one atomic step: from then
  on the facet does not exist) and removing it there (:func:`remove_store`).

Leftovers of a crash in ``scratch/`` are removed when the next data operation starts
(:func:`clear_scratch`). All functions are blocking: run them on a writer thread.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from typing import TYPE_CHECKING, Final

from ..storage import fsync_dir

if TYPE_CHECKING:
    from pathlib import Path

SCRATCH_DIR: Final = "scratch"
DATA_FILE: Final = "data.mdb"
LOCK_FILE: Final = "lock.mdb"
CHUNK_BYTES: Final = 1024 * 1024


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, fsyncing each new entry's parent."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(directory.parent)


def new_scratch_dir(data_dir: Path) -> Path:
    """A fresh, empty private directory under ``<data dir>/scratch/``."""
    path = data_dir / SCRATCH_DIR / secrets.token_hex(8)
    make_dirs(path)
    return path


def clear_scratch(data_dir: Path) -> None:
    """Remove what crashed operations left in ``scratch/``."""
    root = data_dir / SCRATCH_DIR
    if root.is_dir():
        for entry in os.scandir(root):
            shutil.rmtree(entry.path, ignore_errors=True)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def install_store(staged: Path, target: Path) -> None:
    """Make the store built in ``staged`` the one at ``target``, atomically; fsynced.

    ``staged`` holds a verified, fsynced ``data.mdb`` (and the listing hint). A missing
    target directory is created by renaming ``staged`` onto it; an existing one gets the new
    data file by ``rename`` over the old one (the facet is old or new, never absent). The old
    lock file goes: the next open recreates it (no process has the store open during a hold).
    """
    if not target.exists():
        make_dirs(target.parent)
        os.rename(staged, target)
        fsync_dir(target.parent)
        fsync_dir(target)
        return
    for entry in sorted(os.scandir(staged), key=lambda entry: entry.name == DATA_FILE):
        os.replace(entry.path, target / entry.name)  # the data file last: it decides
    (target / LOCK_FILE).unlink(missing_ok=True)
    fsync_dir(target)
    os.rmdir(staged)


def remove_store(target: Path, data_dir: Path) -> bool:
    """Delete the store directory ``target``; False if there was none.

    The rename into ``scratch/`` is the atomic step (fsynced); the removal after it may be
    interrupted and is finished by :func:`clear_scratch`.
    """
    if not target.exists():
        return False
    trash = data_dir / SCRATCH_DIR / f"deleted-{secrets.token_hex(8)}"
    make_dirs(trash.parent)
    os.rename(target, trash)
    fsync_dir(target.parent)
    shutil.rmtree(trash)
    return True
