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

Timer changes (``self.timers``) live in the same layers, in ``timers`` (name -> record, None to
delete), so they commit, roll back and are read exactly like data writes. ``timers`` stays None
until a timer is written: a facet without timers pays nothing for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from ..storage import DATA_DB, TIMERS_DB, CommitBatch
from ._timer_record import encode_record

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._timer_record import TimerRecord


@final
class Layer:
    """Writes of one scope: data keys, the ``cleared`` flag, system-db writes and timers."""

    __slots__ = ("cleared", "data", "system", "timers")

    def __init__(self) -> None:
        self.cleared = False
        self.data: dict[bytes, bytes | None] = {}
        self.system: dict[tuple[bytes, bytes], bytes | None] = {}
        self.timers: dict[str, TimerRecord | None] | None = None

    def is_empty(self) -> bool:
        return not self.cleared and not self.data and not self.system and self.timers is None

    def set_timer(self, name: str, record: TimerRecord | None) -> None:
        """Write timer ``name`` (None: delete it) in this layer."""
        if self.timers is None:
            self.timers = {}
        self.timers[name] = record

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
        if child.timers is not None:
            if self.timers is None:
                self.timers = child.timers  # the child is discarded after being absorbed
            else:
                self.timers.update(child.timers)

    def to_batch(self) -> CommitBatch:
        system = self.system
        if self.timers is not None:
            system = dict(system)
            for name, record in self.timers.items():
                encoded = None if record is None else encode_record(record)
                system[(TIMERS_DB, name.encode())] = encoded
        return CommitBatch(cleared=self.cleared, data=self.data, system=system)


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


def lookup_timer(layers: Sequence[Layer], name: str) -> TimerRecord | object | None:
    """Timer ``name`` in the topmost layer holding it (None: deleted), or ``_MISSING``."""
    for layer in reversed(layers):
        if layer.timers is not None:
            record = layer.timers.get(name, _MISSING)
            if record is not _MISSING:
                return record
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
