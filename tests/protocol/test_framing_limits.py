"""What decoding a frame may allocate: linear in the frame, whatever its array headers claim."""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest

from facetrt._errors import RemoteProtocolError
from facetrt.protocol import FrameDecoder, encode_frame
from facetrt.protocol._framing import ARRAY_PREALLOCATED_MAX


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _peak_while_decoding(frame: bytes) -> tuple[int, Exception | None]:
    decoder = FrameDecoder()
    decoder.feed(frame)
    tracemalloc.start()
    try:
        decoder.next_body()
    except RemoteProtocolError as exc:
        error: Exception | None = exc
    else:
        error = None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


def test_nested_array_headers_fail_without_allocating_for_their_claims() -> None:
    """Regression (fuzz/corpus/frames/repro-nested-array-headers): 1000 nested "array 16"
    headers claiming 3000 elements each, 3 KB in all, made the decoder preallocate 80 KB per
    header (80 MB) and spend ~60 ms before failing. Now it fails having allocated ~nothing."""
    payload = b"\x81\xa1t" + b"\xdc\x0b\xb8" * 1000
    peak, error = _peak_while_decoding(_frame(payload))
    assert peak < 64 * len(payload)
    assert isinstance(error, RemoteProtocolError)
    assert "ends inside a value" in error.message


def test_long_arrays_still_decode_and_round_trip() -> None:
    body: dict[str, object] = {
        "t": "call",
        "args": [list(range(ARRAY_PREALLOCATED_MAX + 1)), [[1] * 300] * 3],
        "kwargs": {"k": list(range(5000))},
    }
    decoder = FrameDecoder()
    decoder.feed(encode_frame(body) * 2)
    assert decoder.next_bodies(5) == [body, body]


@pytest.mark.parametrize(
    "payload",
    [
        # an array of 100 declared, 99 present
        msgpack.packb({"a": list(range(99))})[:-99] + b"\xdc\x00\x64" + bytes(range(99)),
        # a long array holding invalid UTF-8 text
        b"\x81\xa1a\xdc\x00\x41" + b"\xa1\xff" * 65,
        # a long array followed by a second object
        msgpack.packb({"a": list(range(100))}) + b"\xc0",
        # a long array inside a body that is not a map
        msgpack.packb(list(range(100))),
    ],
    ids=["truncated", "bad-utf8", "extra-data", "not-a-map"],
)
def test_bad_bodies_with_long_arrays_are_protocol_errors(payload: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(_frame(payload))
    with pytest.raises(RemoteProtocolError):
        decoder.next_body()
