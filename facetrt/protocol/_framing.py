"""Frames: a 4-byte big-endian length, then that many bytes of one msgpack map.

Layout::

    +----------------+---------------------------------+
    | length (u32 BE)| body: msgpack map, `length` bytes|
    +----------------+---------------------------------+

Rules and limits (why):
- ``length`` is checked against ``frame_bytes_max`` *before* any body byte is buffered, so a
  hostile peer cannot make us allocate more than the limit. A zero length is a violation.
- The body is decoded with ``raw=False`` (str is UTF-8), ``strict_map_key=True`` (map keys are
  str or bytes), no extension types (``ext_hook`` refuses them) and str/bin/array/map limits
  equal to the body's length (an entry takes at least one byte).
- What decoding allocates stays linear in the body's length. msgpack preallocates the list an
  array header declares (up to ~10,000 slots, 80 KB) before any element arrives, and each
  nested header does it again: 3 KB of nested ``array 16`` headers made one frame allocate
  80 MB and take 56 ms to fail (found by ``fuzz/fuzz_frames.py``). So a body is first decoded
  with arrays of at most ``ARRAY_PREALLOCATED_MAX`` elements (at most 512 bytes preallocated
  per header of 1 to 5 bytes); a body with a longer array is walked by msgpack's ``skip``,
  which builds no objects, and decoded again only if every element it declares is there. Only
  bodies with long arrays pay for the second pass.
- Any decode failure is a :class:`RemoteProtocolError`: msgpack raises more than
  ``UnpackException`` (ValueError, TypeError, OverflowError, ...), so this one boundary catches
  ``Exception``.

No sockets, no clocks, no trio here.
"""

from __future__ import annotations

import struct
from typing import Final

import msgpack

from .._errors import RemoteProtocolError
from .._values import packb

HEADER: Final = struct.Struct(">I")
HEADER_BYTES: Final = HEADER.size
FRAME_BYTES_MAX_DEFAULT: Final = 4 * 1024 * 1024


# The longest array decoded in one pass; see the module docstring.
ARRAY_PREALLOCATED_MAX: Final = 64


def _refuse_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _unpack(payload: bytes | memoryview, length: int, array_len_max: int) -> object:
    return msgpack.unpackb(
        payload,
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_refuse_ext,
        max_str_len=length,
        max_bin_len=length,
        max_array_len=array_len_max,
        max_map_len=length,
        max_ext_len=0,
    )


_header = HEADER.pack


def encode_frame(body: dict[str, object]) -> bytes:
    """One frame holding ``body``; the caller checks the size against the peer's limit."""
    payload: bytes = packb(body)  # the shared Packer (_values.packb: 0.12 us, not 0.6)
    return _header(len(payload)) + payload


class FrameDecoder:
    """Incremental frame decoder: feed bytes, take decoded bodies.

    Args:
        frame_bytes_max: the largest body accepted.
    """

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT) -> None:
        self.frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()
        self._offset = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._offset

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_body(self) -> dict[str, object] | None:
        """The next complete frame's decoded body, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: bad length, undecodable body, or a body that is not a map.
        """
        bodies = self.next_bodies(1)
        return bodies[0] if bodies else None

    def next_bodies(self, limit: int) -> list[dict[str, object]]:
        """Up to ``limit`` complete frames' decoded bodies, in order; empty if none is complete.

        Decoding a whole read at once is the batched path: one call per read instead of one
        per frame, and each body is decoded from a view of the buffer, not a copy.

        Raises:
            RemoteProtocolError: bad length, undecodable body, or a body that is not a map.
                The bodies before the bad frame are consumed and lost with the connection.
        """
        buffer = self._buffer
        offset = self._offset
        end = len(buffer)
        bodies: list[dict[str, object]] = []
        frame_bytes_max = self.frame_bytes_max
        try:
            with memoryview(buffer) as view:
                while len(bodies) < limit and end - offset >= HEADER_BYTES:
                    (length,) = HEADER.unpack_from(buffer, offset)
                    if length == 0 or length > frame_bytes_max:
                        raise RemoteProtocolError(
                            f"frame length {length} outside 1..{frame_bytes_max} bytes"
                        )
                    start = offset + HEADER_BYTES
                    if end - start < length:
                        break
                    offset = start + length
                    with view[start:offset] as payload:
                        body = self._decode(payload)
                    if type(body) is not dict:
                        raise RemoteProtocolError(
                            f"frame body must be a msgpack map, got {type(body).__name__}"
                        )
                    bodies.append(body)
        finally:
            # The view is released before the buffer may shrink (a bytearray with a live
            # export cannot be resized).
            self._offset = offset
        self._compact()
        return bodies

    def _decode(self, payload: bytes | memoryview) -> object:
        length = len(payload)  # at most frame_bytes_max: next_bodies checked the prefix
        try:
            try:
                return _unpack(payload, length, ARRAY_PREALLOCATED_MAX)
            except ValueError:
                # A longer array (or a bad body, which fails again below): decode it only
                # once msgpack's skip, which builds nothing, has found every element.
                unpacker = msgpack.Unpacker(max_buffer_size=length)
                unpacker.feed(payload)
                unpacker.skip()  # OutOfData when an array declares more than follows
                return _unpack(payload, length, length)
        except msgpack.OutOfData:
            raise RemoteProtocolError("undecodable frame body: it ends inside a value") from None
        except Exception as exc:
            raise RemoteProtocolError(f"undecodable frame body: {exc}") from exc

    def _compact(self) -> None:
        # Drop consumed bytes once they dominate, so the buffer stays bounded by one frame.
        if self._offset and self._offset * 2 >= len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0
