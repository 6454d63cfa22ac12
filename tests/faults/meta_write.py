"""Make LMDB's meta page writes of one environment fail, in this process, without libfiu.

LMDB (``metasync``, ``writemap=False``) writes its data pages through one descriptor of
``data.mdb`` and its meta page through a second one opened with ``O_DSYNC``. Putting a
read-only descriptor in place of the second (``dup2``) makes exactly the meta page write of
the next commit fail (``EBADF``), after the data pages were written and synced: the one failure
after which LMDB marks the environment fatal and refuses every later transaction
(``MDB_PANIC``) until it is closed. The real descriptor is put back when the block ends.

Linux only (``/proc/self/fdinfo`` tells the two descriptors apart by their flags).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


def meta_descriptor(environment: Path) -> int:
    """The ``O_DSYNC`` descriptor this process holds on ``environment``/data.mdb.

    Raises:
        LookupError: there is none (the environment is not open here, or opened otherwise).
    """
    target = os.path.realpath(environment / "data.mdb")
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != target:
                continue
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, among others)
        flags = next(line.split()[1] for line in info.splitlines() if line.startswith("flags:"))
        if int(flags, 8) & os.O_DSYNC:
            found.append(int(name))
    if len(found) != 1:
        raise LookupError(f"expected one O_DSYNC descriptor on {target}, found {found}")
    return found[0]


@contextlib.contextmanager
def failing_meta_writes(environment: Path) -> Iterator[None]:
    """While the block runs, every meta page write of ``environment`` fails with EBADF."""
    descriptor = meta_descriptor(environment)
    saved = os.dup(descriptor)
    refusing = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(refusing, descriptor, inheritable=False)
        yield
    finally:
        # If the environment was closed meanwhile (reopened after the failure), the slot is
        # closed or holds another file now: put the real one back only where our stand-in is.
        try:
            ours = os.path.samestat(os.fstat(descriptor), os.fstat(refusing))
        except OSError:
            ours = False
        if ours:
            os.dup2(saved, descriptor, inheritable=False)
        os.close(saved)
        os.close(refusing)
