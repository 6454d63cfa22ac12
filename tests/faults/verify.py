"""Verify every LMDB environment of a data directory, as the crash tests do (``lmdb.verify``).

Run only while no daemon has the directory open: facet stores, the system store and the timer
index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.crash import STORE_GLOB, verify_store

if TYPE_CHECKING:
    from pathlib import Path

NODE_ENVIRONMENTS = ("system", "timers")


def environments(data_dir: Path) -> list[Path]:
    """The directory of every LMDB environment under ``data_dir``."""
    found = [path.parent for path in sorted(data_dir.glob(STORE_GLOB))]
    found += [data_dir / name for name in NODE_ENVIRONMENTS if (data_dir / name).is_dir()]
    return found


def verify_all(data_dir: Path) -> tuple[int, list[str]]:
    """(environments verified, problems found: none when every one is sound).

    A facet directory whose data file is empty (a creation that failed before LMDB wrote its
    first page, and could not be cleaned up) holds no data and is not an environment yet.
    """
    verified = 0
    problems: list[str] = []
    for directory in environments(data_dir):
        if (directory / "data.mdb").stat().st_size == 0:
            continue
        problems += [f"{directory}: {problem}" for problem in verify_store(directory)]
        verified += 1
    return verified, problems
