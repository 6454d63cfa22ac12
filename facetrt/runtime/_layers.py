"""Write layers: the not-yet-durable writes a facet's reads must see.

Reads of a facet go through a stack of layers, top first, then the LMDB store::

    transaction() layers      writes of open ``with storage.transaction():`` blocks
    message layer             writes of the message being handled
    accumulated layer         writes of finished messages waiting for the next commit
    in-flight layer           writes of the batch a writer thread is committing now
    store (LMDB)              durable state

A key's value comes from the topmost layer that holds it (None is a tombstone). A layer with
``cleared`` set (``delete_all``) hides every layer below it and the store. Absorbing a child
into its parent (a message finishing, a transaction block exiting) keeps both rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from ..storage import DATA_DB, CommitBatch

if TYPE_CHECKING:
    from collections.abc import Sequence


@final
class Layer:
    """Writes of one scope: data keys, the ``cleared`` flag, and system-db writes."""

    __slots__ = ("cleared", "data", "system")

    def __init__(self) -> None:
        self.cleared = False
        self.data: dict[bytes, bytes | None] = {}
        self.system: dict[tuple[bytes, bytes], bytes | None] = {}

    def is_empty(self) -> bool:
        return not self.cleared and not self.data and not self.system

    def clear(self) -> None:
        self.data.clear()
        self.cleared = True

    def absorb(self, child: Layer) -> None:
        """Apply ``child`` on top of this layer (child's writes win)."""
        if child.cleared:
            self.data = child.data
            self.cleared = True
        else:
            self.data.update(child.data)
        self.system.update(child.system)

    def to_batch(self) -> CommitBatch:
        return CommitBatch(cleared=self.cleared, data=self.data, system=self.system)


_MISSING = object()


def lookup(layers: Sequence[Layer], key: bytes) -> bytes | object | None:
    """The value of ``key`` in the topmost layer holding it, or ``_MISSING`` to read the store.

    Returns None for a tombstone (or a key hidden by a cleared layer).
    """
    for layer in reversed(layers):
        value = layer.data.get(key, _MISSING)
        if value is not _MISSING:
            return value
        if layer.cleared:
            return None
    return _MISSING


def lookup_system(layers: Sequence[Layer], db: bytes, key: bytes) -> bytes | object | None:
    assert db != DATA_DB
    for layer in reversed(layers):
        value = layer.system.get((db, key), _MISSING)
        if value is not _MISSING:
            return value
    return _MISSING


def overlay_in_range(
    layers: Sequence[Layer], low: bytes | None, high: bytes | None
) -> tuple[dict[bytes, bytes | None], bool]:
    """Merge the layers' data writes with ``low <= key < high``.

    Returns:
        (key -> value or tombstone, whether the store below is still visible).
    """
    merged: dict[bytes, bytes | None] = {}
    for layer in reversed(layers):
        for key, value in layer.data.items():
            if key in merged:
                continue
            if (low is None or key >= low) and (high is None or key < high):
                merged[key] = value
        if layer.cleared:
            return merged, False
    return merged, True


MISSING = _MISSING
