"""An imported store opens whatever its size (found by the seeded simulation, seed 40 of the
first run with data operations).

An import builds its store from the export's lines and creates only the dbs that hold
entries: an export of a facet that never set a timer gives a store without the ``timers``
db (and without ``idem`` if no call was keyed). Opening a store creates the missing system
dbs in a write transaction, which needs a few fresh pages; the store was opened with a map of
the next power of two above its file size, so a file within a page or two of a power of two
left no room: every activation failed ``MDB_MAP_FULL`` and the facet could not be used
until the node's initial map size was raised.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import msgpack

from facetrt import FacetAddress
from facetrt.data._jsonl import ImportBuilder
from facetrt.storage._store import DATA_FILE, FacetStore

if TYPE_CHECKING:
    from pathlib import Path

MAP_BYTES = 64 * 1024
PAGE = 4096


def _import(directory: Path, values: int) -> int:
    """Import a facet with ``values`` data entries and no timers; its data file's size."""
    lines = [
        {"format": "facetrt-export", "version": 1, "tenant": "t", "agent": "a", "class": "C"},
        {"db": "meta", "key": "class", "value": "C"},
        *({"db": "data", "key": f"k{i:04d}", "value": "x" * 700} for i in range(values)),
        {"end": True, "entries": values + 1},
    ]
    builder = ImportBuilder(directory, map_size_bytes=1 << 30, value_bytes_max=1 << 20)
    try:
        builder.write([json.dumps(line).encode() for line in lines], 1)
        builder.finish(FacetAddress("t", "a"))
    finally:
        builder.close()
    return (directory / DATA_FILE).stat().st_size


def test_an_imported_store_at_the_edge_of_its_map_opens(tmp_path: Path) -> None:
    edge = None
    for values in range(1, 200):
        directory = tmp_path / f"import-{values}"
        directory.mkdir()
        size = _import(directory, values)
        if MAP_BYTES - PAGE <= size <= MAP_BYTES:
            edge = directory
            break
        if size > MAP_BYTES:
            break
    assert edge is not None, "no import landed within a page of 64 KiB: adjust the values"
    store = FacetStore(edge, map_size_bytes=MAP_BYTES, map_size_bytes_max=1 << 30)
    try:
        raw = store.get(b"k0000")
        assert raw is not None
        assert msgpack.unpackb(raw) == "x" * 700
        assert store.map_size_bytes > MAP_BYTES
    finally:
        store.close()
