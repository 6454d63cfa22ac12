"""The facetrt wire protocol, sans-IO: no sockets, no clocks, no trio (see docs/protocol.md)."""

from __future__ import annotations

from ._connection import NEED_DATA as NEED_DATA
from ._connection import Closed as Closed
from ._connection import Connection as Connection
from ._connection import NeedData as NeedData
from ._connection import Role as Role
from ._connection import State as State
from ._events import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._events import Bye as Bye
from ._events import Call as Call
from ._events import ErrorReply as ErrorReply
from ._events import Event as Event
from ._events import Hello as Hello
from ._events import Ping as Ping
from ._events import Pong as Pong
from ._events import Result as Result
from ._events import Welcome as Welcome
from ._framing import FRAME_BYTES_MAX_DEFAULT as FRAME_BYTES_MAX_DEFAULT
from ._framing import FrameDecoder as FrameDecoder
from ._framing import encode_frame as encode_frame

__all__ = [
    "FRAME_BYTES_MAX_DEFAULT",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Bye",
    "Call",
    "Closed",
    "Connection",
    "ErrorReply",
    "Event",
    "FrameDecoder",
    "Hello",
    "NeedData",
    "Ping",
    "Pong",
    "Result",
    "Role",
    "State",
    "Welcome",
    "encode_frame",
]
