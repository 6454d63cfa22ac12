"""verify_environments finds every LMDB environment of a data directory (facet stores, the timer
index, the system store), walks each with ``lmdb.verify`` and reports a damaged one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lmdb

from tests.crash import DATA_FILE, verify_environments

if TYPE_CHECKING:
    from pathlib import Path

PAGE_BYTES = 4096


def _write(directory: Path, entries: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(directory), map_size=1 << 20, max_dbs=2, sync=True, lock=True)
    try:
        with env.begin(write=True) as txn:
            for n in range(entries):
                txn.put(f"key-{n:06d}".encode(), b"value" * 20)
    finally:
        env.close()


def _layout(data_dir: Path) -> list[Path]:
    """A facet store, the timer index and the system store, as a daemon lays them out."""
    directories = [
        data_dir / "tenants" / "t" / "facets" / "ab" / "abcd",
        data_dir / "timers",
        data_dir / "system",
    ]
    for directory in directories:
        _write(directory, 200)
    return directories


def test_every_environment_is_walked(tmp_path: Path) -> None:
    _layout(tmp_path)
    assert verify_environments(tmp_path) == (3, [])


def test_a_damaged_environment_is_reported(tmp_path: Path) -> None:
    directories = _layout(tmp_path)
    data = directories[0] / DATA_FILE
    damaged = bytearray(data.read_bytes())
    # Past the two meta pages: the tree's pages.
    damaged[2 * PAGE_BYTES + 16 : 2 * PAGE_BYTES + 64] = b"\xff" * 48
    data.write_bytes(bytes(damaged))
    walked, problems = verify_environments(tmp_path)
    assert walked == 3
    assert problems
    assert all(problem.startswith(f"{directories[0]}: lmdb.verify: ") for problem in problems)


def test_an_empty_data_file_is_not_walked(tmp_path: Path) -> None:
    """A kill between creating a store's file and LMDB writing its first pages leaves it
    empty: LMDB initialises it on the next open, so there is nothing to verify yet."""
    directory = tmp_path / "tenants" / "t" / "facets" / "ab" / "abcd"
    directory.mkdir(parents=True)
    (directory / DATA_FILE).write_bytes(b"")
    assert verify_environments(tmp_path) == (0, [])
