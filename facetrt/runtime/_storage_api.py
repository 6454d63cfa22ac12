"""Storage: the synchronous key-value API facet code uses as ``self.storage`` (SPEC §3).

Reads see the message's own unflushed writes, including in :meth:`Storage.list`, through the
layers of ``_layers.py``. Writes only touch the message's layer; the activation commits that
layer, with those of neighbouring messages, in one LMDB transaction after the handler returns.
Keys are str of 1 to 511 UTF-8 bytes; values are msgpack values up to ``value_bytes_max``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final, final

from .._errors import BadRequestError
from .._values import Value, decode_value, encode_scalar, encode_value
from ..storage import KEY_BYTES_MAX
from ._layers import MISSING, Layer, overlay_in_range

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from ..storage import FacetStore

_NO_DEFAULT: Final = None


def encode_key(key: object) -> bytes:
    """Check and encode a storage key.

    Raises:
        BadRequestError: not a str, empty, or over 511 UTF-8 bytes.
    """
    if type(key) is not str:
        raise BadRequestError(f"storage key must be str, got {type(key).__name__}")
    try:
        data = key.encode()
    except UnicodeEncodeError as exc:
        raise BadRequestError(f"storage key {key!r} is not valid UTF-8: {exc.reason}") from None
    if not 0 < len(data) <= KEY_BYTES_MAX:
        raise BadRequestError(
            f"storage key must be 1 to {KEY_BYTES_MAX} UTF-8 bytes, got {len(data)}"
        )
    return data


KEY_CACHE_MAX: Final = 4096


class StorageOutsideMessageError(RuntimeError):
    """Raised when facet code writes storage outside a message (e.g. from a spawned task)."""


@final
class Storage:
    """A facet's storage; one per activation. Methods are synchronous and never yield."""

    def __init__(self, store: FacetStore, pending: list[Layer], *, value_bytes_max: int) -> None:
        self._store = store
        # Shared with the activation, which swaps the accumulated and in-flight layers.
        self._pending = pending
        self._stack: list[Layer] = []
        self._value_bytes_max = value_bytes_max
        # Handlers use the same few keys again and again: validate and encode each once.
        self._keys: dict[str, bytes] = {}

    def _key(self, key: str) -> bytes:
        try:
            return self._keys[key]
        except (KeyError, TypeError):  # new, or not even hashable (encode_key refuses it)
            encoded = encode_key(key)
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()  # bounded; a refill costs one encode per key
            self._keys[key] = encoded
            return encoded

    # -- used by the activation ------------------------------------------------------------

    def begin_message(self) -> Layer:
        assert not self._stack, "message started inside another"
        layer = Layer()
        self._stack.append(layer)
        return layer

    def end_message(self) -> None:
        del self._stack[:]

    def layers(self) -> list[Layer]:
        return [*self._pending, *self._stack]

    def _top(self) -> Layer:
        if not self._stack:
            raise StorageOutsideMessageError(
                "storage can only be written while a message (or hook) of this facet runs"
            )
        return self._stack[-1]

    # -- reads -----------------------------------------------------------------------------

    def _get_raw(self, key: bytes) -> bytes | None:
        # lookup() over [*pending, *stack], inlined: every read of every handler comes here.
        for layers in (self._stack, self._pending):
            for layer in reversed(layers):
                found = layer.data.get(key, MISSING)
                if found is not MISSING:
                    return found  # type: ignore[return-value]  # bytes or a tombstone
                if layer.cleared:
                    return None
        return self._store.get(key)

    def get(self, key: str, default: Value = _NO_DEFAULT) -> Value:
        """The value stored under ``key``, or ``default``."""
        raw = self._get_raw(self._key(key))
        return default if raw is None else decode_value(raw)

    def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        """The values of those ``keys`` that exist, in the order given."""
        result: dict[str, Value] = {}
        for key in keys:
            raw = self._get_raw(encode_key(key))
            if raw is not None:
                result[key] = decode_value(raw)
        return result

    def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Value]:
        """Entries in key order (UTF-8 byte order), or reversed, as an ordered dict.

        Args:
            prefix: only keys starting with it.
            start: first key included (inclusive); exclusive with ``start_after``.
            start_after: keys strictly after it.
            end: keys strictly before it.
            reverse: descending order (``limit`` then counts from the end).
            limit: at most this many entries (a positive int).

        Raises:
            BadRequestError: both ``start`` and ``start_after``, or a bad ``limit``.
        """
        if start is not None and start_after is not None:
            raise BadRequestError("list: give start or start_after, not both")
        if limit is not None and (type(limit) is not int or limit <= 0):
            raise BadRequestError(f"list: limit must be a positive int, got {limit!r}")
        low, high = _bounds(prefix, start, start_after, end)
        if low is not None and high is not None and low >= high:
            return {}
        overlay, store_visible = overlay_in_range(self.layers(), low, high)
        result: dict[str, Value] = {}
        for key, raw in self._merge(overlay, store_visible, low, high, reverse):
            result[key.decode()] = decode_value(raw)
            if limit is not None and len(result) >= limit:
                break
        return result

    def _merge(
        self,
        overlay: dict[bytes, bytes | None],
        store_visible: bool,
        low: bytes | None,
        high: bytes | None,
        reverse: bool,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Merge the overlay (sorted) with the store's range; overlay entries win."""
        pending = sorted(overlay, reverse=reverse)
        index = 0
        if store_visible:
            base = self._store.iterate(low=low, high=high, reverse=reverse)
            with contextlib.closing(base):
                for key, raw in base:
                    while index < len(pending) and (
                        pending[index] > key if reverse else pending[index] < key
                    ):
                        value = overlay[pending[index]]
                        index += 1
                        if value is not None:
                            yield pending[index - 1], value
                    if index < len(pending) and pending[index] == key:
                        value = overlay[key]
                        index += 1
                        if value is not None:
                            yield key, value
                        continue
                    yield key, raw
        for key in pending[index:]:
            value = overlay[key]
            if value is not None:
                yield key, value

    # -- writes ----------------------------------------------------------------------------

    def put(self, key: str, value: Value) -> None:
        """Store ``value`` under ``key`` (committed when the message ends)."""
        encoded_key = self._key(key)
        encoded = encode_scalar(value)
        if encoded is None or len(encoded) > self._value_bytes_max:
            encoded = encode_value(value, bytes_max=self._value_bytes_max, what=f"value of {key!r}")
        self._top().data[encoded_key] = encoded

    def put_many(self, entries: Mapping[str, Value]) -> None:
        """Store every entry; all or none (a bad entry raises before anything is written)."""
        encoded = {
            encode_key(key): encode_value(
                value, bytes_max=self._value_bytes_max, what=f"value of {key!r}"
            )
            for key, value in entries.items()
        }
        self._top().data.update(encoded)

    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""
        encoded_key = encode_key(key)
        top = self._top()
        existed = self._get_raw(encoded_key) is not None
        top.data[encoded_key] = None
        return existed

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete ``keys``; return how many existed."""
        encoded_keys = [encode_key(key) for key in keys]
        top = self._top()
        count = 0
        for encoded_key in dict.fromkeys(encoded_keys):
            if self._get_raw(encoded_key) is not None:
                count += 1
            top.data[encoded_key] = None
        return count

    def delete_all(self) -> None:
        """Delete every key of this facet (its timers and binding are kept)."""
        self._top().clear()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A block whose writes are all kept if it exits normally, all discarded if it raises.

        Blocks nest. The message's other writes are unaffected by a rolled-back block.
        """
        self._top()
        layer = Layer()
        self._stack.append(layer)
        try:
            yield
        except BaseException:
            popped = self._stack.pop()
            assert popped is layer
            raise
        popped = self._stack.pop()
        assert popped is layer
        self._stack[-1].absorb(layer)


def _bounds(
    prefix: str | None, start: str | None, start_after: str | None, end: str | None
) -> tuple[bytes | None, bytes | None]:
    low: bytes | None = None
    high: bytes | None = None
    if prefix is not None:
        if type(prefix) is not str:
            raise BadRequestError("list: prefix must be str")
        try:
            encoded = prefix.encode()
        except UnicodeEncodeError as exc:
            raise BadRequestError(f"list: prefix is not valid UTF-8: {exc.reason}") from None
        low = encoded or None
        high = _prefix_end(encoded)
    if start is not None:
        candidate = encode_key(start)
        low = candidate if low is None else max(low, candidate)
    if start_after is not None:
        # The smallest key after k in byte order is k + b"\x00".
        candidate = encode_key(start_after) + b"\x00"
        low = candidate if low is None else max(low, candidate)
    if end is not None:
        candidate = encode_key(end)
        high = candidate if high is None else min(high, candidate)
    return low, high


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
