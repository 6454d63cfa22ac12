"""Data-operation benchmarks: listing many facets, and backup speed against a plain file copy.

    .venv/bin/python -m benchmarks.dataops [--facets 100000] [--backup-mb 200] [--dir D]

1. **Listing.** ``--facets`` facet directories are created directly on disk, as the storage
   layer lays them out (hashed directory, ``facet.id`` hint with class, a placeholder
   ``data.mdb``): listing never opens LMDB, it reads hints and ``stat``s data files, so a
   placeholder measures the same work as a real store at a fraction of the set-up time (a
   real store costs ~1 ms to create). Then every facet is listed through
   ``DataOperations.list_facets`` in pages of 1,000 (facets/s), and one page of 100 is read
   from the middle (the cost of paging deep into a large tenant).
2. **Backup.** 20 real facets are filled through ``Runtime.call`` to ``--backup-mb`` in all,
   then backed up with ``DataOperations.backup`` (compacting copy while serving, fsync of file
   and directories, sha256, ``lmdb.verify`` and a read of each copy). The baseline, in the
   same run, copies the same ``data.mdb`` files with ``shutil.copyfile`` and fsyncs each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import trio

from facetrt import Facet, RuntimeConfig, open_runtime, rpc
from facetrt.data import DataOperations
from facetrt.storage._registry import write_hint

from ._util import describe_load, load_snapshot, machine_info

TENANT = "bench"
BACKUP_FACETS = 20
VALUE_BYTES = 512 * 1024


class Blob(Facet):
    @rpc
    async def put(self, key: str, value: bytes) -> None:
        self.storage.put(key, value)


def create_listing_facets(data_dir: Path, count: int) -> float:
    """Lay out ``count`` facet directories with hints; returns the seconds it took."""
    started = time.perf_counter()
    from facetrt._ids import FacetAddress

    for index in range(count):
        address = FacetAddress(TENANT, f"agent-{index:07d}")
        path = data_dir / address.relative_path()
        path.mkdir(parents=True, exist_ok=True)
        (path / "data.mdb").write_bytes(b"\0" * 4096)
        write_hint(path, address, {"class": "Blob"})
    return time.perf_counter() - started


async def bench_listing(data_dir: Path, count: int) -> dict[str, float]:
    async with open_runtime(data_dir, classes={"Blob": Blob}) as runtime:
        ops = DataOperations(runtime, system=None)
        started = time.perf_counter()
        listed, cursor, middle = 0, None, None
        while True:
            page, cursor = await ops.list_facets(TENANT, cursor=cursor, limit=1000)
            listed += len(page)
            if listed >= count // 2 and middle is None:
                middle = cursor
            if cursor is None:
                break
        seconds = time.perf_counter() - started
        assert listed == count, (listed, count)
        started = time.perf_counter()
        await ops.list_facets(TENANT, cursor=middle, limit=100)
        page_seconds = time.perf_counter() - started
    return {
        "facets": listed,
        "seconds": seconds,
        "facets_per_second": listed / seconds,
        "page_of_100_in_the_middle_ms": page_seconds * 1000,
    }


async def bench_backup(data_dir: Path, scratch: Path, megabytes: int) -> dict[str, float]:
    config = RuntimeConfig(commit_threads=4)
    values_per_facet = max(1, megabytes * 1024 * 1024 // VALUE_BYTES // BACKUP_FACETS)
    async with open_runtime(data_dir, classes={"Blob": Blob}, config=config) as runtime:
        for facet in range(BACKUP_FACETS):
            for index in range(values_per_facet):
                value = os.urandom(VALUE_BYTES)
                await runtime.call(TENANT, f"f{facet}", "put", f"k{index}", value, cls="Blob")
        ops = DataOperations(runtime, system=None)
        started = time.perf_counter()
        result = await ops.backup(scratch / "backup", tenant=TENANT)
        backup_seconds = time.perf_counter() - started
    backed = result["bytes"]
    assert isinstance(backed, int)
    return {"facets": BACKUP_FACETS, "backup_bytes": backed, "backup_seconds": backup_seconds}


def plain_copy(data_dir: Path, target: Path) -> tuple[int, float]:
    """The baseline: copy every store's data.mdb with shutil.copyfile and fsync it."""
    sources = sorted(data_dir.glob("tenants/*/facets/*/*/data.mdb"))
    target.mkdir()
    started = time.perf_counter()
    for index, path in enumerate(sources):
        copy = target / f"{index}.mdb"
        shutil.copyfile(path, copy)
        fd = os.open(copy, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return sum(path.stat().st_size for path in sources), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facets", type=int, default=100_000)
    parser.add_argument("--backup-mb", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    options = parser.parse_args()
    info = machine_info(options.dir or Path(tempfile.gettempdir()))
    print(f"commit {info.get('git_commit')}, {os.cpu_count()} CPUs")
    print(describe_load(load_snapshot()))
    with tempfile.TemporaryDirectory(dir=options.dir) as root:
        base = Path(root)
        setup = create_listing_facets(base / "listing", options.facets)
        print(f"created {options.facets:,} facet directories in {setup:.1f} s")
        listing = trio.run(bench_listing, base / "listing", options.facets)
        print(
            f"listing: {listing['facets']:,} facets in {listing['seconds']:.2f} s = "
            f"{listing['facets_per_second']:,.0f} facets/s; a page of 100 in the middle: "
            f"{listing['page_of_100_in_the_middle_ms']:.1f} ms"
        )
        shutil.rmtree(base / "listing")
        (base / "scratch").mkdir()
        backup = trio.run(bench_backup, base / "backup-data", base / "scratch", options.backup_mb)
        store_bytes, copy_seconds = plain_copy(base / "backup-data", base / "scratch" / "plain")
        backup["store_bytes"] = store_bytes
        backup["backup_mb_per_second"] = store_bytes / backup["backup_seconds"] / 1e6
        backup["plain_copy_seconds"] = copy_seconds
        backup["plain_copy_mb_per_second"] = store_bytes / copy_seconds / 1e6
        print(
            f"backup: {backup['facets']} facets, {backup['store_bytes'] / 1e6:.0f} MB of stores "
            f"({backup['backup_bytes'] / 1e6:.0f} MB compacted) in {backup['backup_seconds']:.2f} s"
            f" = {backup['backup_mb_per_second']:.0f} MB/s; plain copy + fsync "
            f"{backup['plain_copy_seconds']:.2f} s = {backup['plain_copy_mb_per_second']:.0f} MB/s"
        )
    print(describe_load(load_snapshot()))


if __name__ == "__main__":
    main()
