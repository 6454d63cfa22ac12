"""In-memory connections between the real client link and the real TCP server's sessions.

Why not loopback sockets: data sent on one is usually, not always, readable at the peer's next
poll (the kernel may defer it to ksoftirqd), and under trio's autojump clock a poll that finds
nothing lets virtual time jump: the schedule would depend on the machine's load. Memory
streams (``trio.testing.memory_stream_pair``) hand bytes over at once, so a seed replays. What
this leaves out: the server's direct ``os.write`` of replies (decision 0009), which needs a
socket descriptor; sessions over any other stream use their writer task, exercised here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import anyio
import anyio.abc
import trio
import trio.testing

if TYPE_CHECKING:
    from trio.testing import MemoryReceiveStream, MemorySendStream

BACKLOG = 16


@final
class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections come from :meth:`connect` (at most BACKLOG waiting)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](BACKLOG)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        await self._receive.aclose()

    async def connect(self) -> ClientStream:
        """A new connection: the server end goes to :meth:`accept`.

        Raises:
            OSError: the listener is closed (connection refused).
        """
        client, server = trio.testing.memory_stream_pair()
        try:
            await self._send.send(server)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionRefusedError("listener closed") from None
        return ClientStream(client)


@final
class ClientStream(anyio.abc.ByteStream):
    """The client's end, as the anyio byte stream the client's ``Link`` reads and writes."""

    def __init__(self, stream: trio.StapledStream[MemorySendStream, MemoryReceiveStream]) -> None:
        self._stream = stream

    def drop(self) -> None:
        """Break the connection now, as a lost network would: the client's calls in flight
        fail, the server reads EOF and its replies go nowhere."""
        self._stream.send_stream.close()
        self._stream.receive_stream.close()

    async def receive(self, max_bytes: int = 65_536) -> bytes:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.ClosedResourceError:
            raise anyio.ClosedResourceError from None
        except trio.BrokenResourceError:
            raise anyio.BrokenResourceError from None
        if not data:
            raise anyio.EndOfStream
        return bytes(data)

    async def send(self, item: bytes) -> None:
        try:
            await self._stream.send_all(item)
        except trio.ClosedResourceError:
            raise anyio.ClosedResourceError from None
        except trio.BrokenResourceError:
            raise anyio.BrokenResourceError from None

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        self.drop()
        await trio.lowlevel.checkpoint()
