"""A data directory whose disk fills up and empties again while the daemon runs.

Preferred: a small tmpfs mounted for the test (needs root with ``CAP_SYS_ADMIN``, as in CI and
the development container): :meth:`SmallDisk.fill` writes a filler file until the file system
is full, so every write that needs a new block fails with ``ENOSPC``, in every file of the
data directory; :meth:`SmallDisk.free` deletes it.

Fallback where mounting is refused: the data directory stays where it is and the daemon gets
a file size limit (``RLIMIT_FSIZE``, set on the running process with ``prlimit``) just above
its largest file, so a write that would grow a file past it fails with ``EFBIG`` (Python
ignores ``SIGXFSZ``, so the process lives); :meth:`SmallDisk.free` lifts the limit. A file
that stays small (a new facet's store) still fits there, which a full disk would refuse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from typing import TYPE_CHECKING, Final, Literal

from tests.faults.daemon import FaultDaemon

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

DISK_BYTES: Final = 48 * 1024 * 1024
FILL_CHUNK: Final = 1024 * 1024
LIMIT_MARGIN_BYTES: Final = 64 * 1024
FILLER: Final = "filler"


def _mount_tmpfs(mount_point: Path, size: int) -> bool:
    """Mount a tmpfs of ``size`` bytes; False where that is not allowed."""
    if os.geteuid() != 0:
        return False
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


class SmallDisk:
    """Where a :class:`FaultDaemon` keeps its data, and the means to fill it.

    Use :func:`small_disk`, which unmounts on exit.
    """

    def __init__(self, root: Path, kind: Literal["tmpfs", "rlimit"], mount_point: Path) -> None:
        self.root = root
        self.kind = kind
        self.mount_point = mount_point
        self.data_dir = mount_point / "data"
        self.daemon: FaultDaemon | None = None

    def make_daemon(self) -> FaultDaemon:
        self.daemon = FaultDaemon(self.root / "daemon", data_dir=self.data_dir, fiu=False)
        return self.daemon

    def fill(self) -> str:
        """Leave no room for new data; returns what a refused write fails with."""
        if self.kind == "tmpfs":
            chunk = b"\0" * FILL_CHUNK
            with (self.mount_point / FILLER).open("wb", buffering=0) as filler:
                # Halve the chunk at each refusal, down to one block: the disk ends up full.
                size = FILL_CHUNK
                while size >= 512:
                    try:
                        filler.write(chunk[:size])
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        size //= 2
            return os.strerror(errno.ENOSPC)
        assert self.daemon is not None
        largest = max(path.stat().st_size for path in self.data_dir.rglob("*") if path.is_file())
        self.daemon.limit_file_size(largest + LIMIT_MARGIN_BYTES)
        return os.strerror(errno.EFBIG)

    def free(self) -> None:
        """Give the space back (the daemon keeps running)."""
        if self.kind == "tmpfs":
            (self.mount_point / FILLER).unlink()
        else:
            assert self.daemon is not None
            self.daemon.limit_file_size(None)


@contextlib.contextmanager
def small_disk(
    root: Path, *, prefer: Literal["tmpfs", "rlimit"] = "tmpfs", size: int = DISK_BYTES
) -> Iterator[SmallDisk]:
    """A tmpfs of ``size`` bytes under ``root`` if preferred and this process may mount one,
    otherwise the file size limit on ``root``; unmounted (the daemon stopped) on exit."""
    mount_point = root / "disk"
    mounted = prefer == "tmpfs" and _mount_tmpfs(mount_point, size)
    if not mounted:
        mount_point.mkdir(parents=True, exist_ok=True)
    disk = SmallDisk(root, "tmpfs" if mounted else "rlimit", mount_point)
    try:
        yield disk
    finally:
        if disk.daemon is not None:
            disk.daemon.stop()
        if mounted:
            subprocess.run(["umount", str(mount_point)], check=True)
