"""The facetrt client: call facets of a daemon over the wire protocol, from any kind of code.

From trio or asyncio::

    async with facetrt.client.connect("tcp://127.0.0.1:7420", key=KEY) as client:
        await client.call("counter-1", "increment", cls="Counter")

From synchronous code (any number of threads)::

    with facetrt.client.SyncClient("tcp://127.0.0.1:7420", key=KEY) as client:
        client.call("counter-1", "increment", cls="Counter")

One connection per client, shared by concurrent calls (pipelined, replies in any order);
per-call deadlines; retries of retryable failures only, always with one idempotency key.
"""

from __future__ import annotations

from ._async import AsyncClient as AsyncClient
from ._async import connect as connect
from ._sync import SyncClient as SyncClient

__all__ = ["AsyncClient", "SyncClient", "connect"]
