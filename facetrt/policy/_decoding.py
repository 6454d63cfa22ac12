"""Content-coding decoding of egress responses, bounded so a compression bomb cannot grow.

httpx decodes a whole network read in one call and stacks one decoder per listed coding, so a
few KiB of ``Content-Encoding: gzip, gzip`` become gigabytes in memory before any size limit
is checked. Egress reads the raw body instead and decodes it here:

- at most one coding, ``gzip`` (``x-gzip``) or ``deflate`` (zlib-wrapped, or raw as some
  servers send it); ``identity`` is no coding. Stacked codings and any other coding (``br``,
  ``zstd``, ...) are refused: the body could not be redacted, so it is not handed back.
- every call yields pieces of at most ``PIECE_BYTES_MAX`` bytes (zlib's ``max_length``), so
  the reader's size check runs before the next piece exists.

Egress sends ``Accept-Encoding: ACCEPT_ENCODING`` itself (a client's value is replaced), so a
well-behaved server never sends a coding refused here.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Final, final

import trio

from .._fetch import FetchError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx

ACCEPT_ENCODING: Final = "gzip, deflate"
PIECE_BYTES_MAX: Final = 64 * 1024
_WBITS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}


@final
class ContentDecoder:
    """Decodes one response body, piece by bounded piece."""

    __slots__ = ("_coding", "_first", "_zlib")

    def __init__(self, content_encoding: str) -> None:
        """Raises: FetchError (kind ``protocol``): a stacked or unsupported coding."""
        codings = [c.strip().lower() for c in content_encoding.split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > 1:
            raise FetchError(
                f"stacked content codings {content_encoding!r} are refused", kind="protocol"
            )
        coding = codings[0] if codings else None
        if coding is not None and coding not in (*_WBITS, "deflate"):
            raise FetchError(
                f"content coding {coding!r} is not one egress decodes (gzip, deflate)",
                kind="protocol",
            )
        self._coding = coding
        self._zlib = None if coding is None else zlib.decompressobj(_WBITS.get(coding, 15))
        self._first = True

    def decode(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of the next raw ``data``, each at most ``PIECE_BYTES_MAX``.

        Raises:
            FetchError: the body is not valid for its coding (kind ``protocol``).
        """
        if self._zlib is None:
            yield data  # no coding: a network read, already bounded by the transport
            return
        while True:
            try:
                piece = self._zlib.decompress(data, PIECE_BYTES_MAX)
            except zlib.error as exc:
                if self._coding == "deflate" and self._first:
                    # No zlib header: raw deflate, as some servers send (httpx does the same).
                    self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._first = False
                    continue
                raise FetchError(
                    f"undecodable {self._coding} body: {exc}", kind="protocol"
                ) from None
            self._first = False
            data = self._zlib.unconsumed_tail
            if piece:
                yield piece
            if not data and len(piece) < PIECE_BYTES_MAX:
                return  # a full piece may leave output pending in zlib: then loop on b""

    def flush(self) -> bytes:
        """What is left at the end of the body (at most zlib's window, 32 KiB)."""
        if self._zlib is None:
            return b""
        try:
            return self._zlib.flush()
        except zlib.error as exc:
            raise FetchError(f"undecodable {self._coding} body: {exc}", kind="protocol") from None


async def read_body(response: httpx.Response, limit: int) -> bytes | None:
    """The decoded body of ``response``, or None once it is over ``limit`` bytes (the rest is
    not read). The caller closes the response.

    Raises:
        FetchError: a coding refused or a body its coding does not decode (kind ``protocol``).
    """
    decoder = ContentDecoder(response.headers.get("content-encoding", ""))
    chunks: list[bytes] = []
    size = 0
    over = False
    failure: FetchError | None = None
    with trio.CancelScope() as stop:
        async for received in response.aiter_raw():
            if stop.cancel_called:
                continue  # already read by httpcore, not yet handed over: dropped
            try:
                for piece in decoder.decode(received):
                    size += len(piece)
                    if size > limit:
                        over = True
                        break
                    chunks.append(piece)
            except FetchError as exc:
                failure = exc
            if over or failure is not None:
                # Stop reading: the next network read is cancelled, inside the innermost of
                # the generators httpcore and httpx stack on it, so all of them unwind
                # (leaving one suspended would leak it until garbage collection).
                stop.cancel()
    if failure is not None:
        raise failure
    if over:
        return None
    chunks.append(decoder.flush())
    body = b"".join(chunks)
    return None if len(body) > limit else body
