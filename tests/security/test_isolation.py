"""Isolation at the edges the abuse matrix refuses: look-alike ids are distinct facets, the
largest ids, keys and frames are accepted, and closed connections give their slots back.

Ids are ASCII (SPEC §2), so Unicode look-alikes never reach a facet (the matrix refuses them)
and no normalisation is needed or done: two ids are the same facet exactly when they are the
same string. The look-alikes left are ASCII ones ("l" and "1", "O" and "0", case, dots and
slashes that would mean something in a path); each is its own facet with its own directory.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import trio

from facetrt import FacetAddress
from tests.security.surfaces import (
    BODY_BYTES_MAX,
    Seen,
    TcpProbe,
    frame_filler,
    http_request,
    http_seen,
    running_node,
)
from tests.util import wait_until

if TYPE_CHECKING:
    from pathlib import Path

# Pairs and groups that look alike, or would name the same file if ids were paths.
LOOK_ALIKES = [
    "agent-l",
    "agent-1",
    "agent-I",
    "agent-O",
    "agent-0",
    "x",
    "X",
    "a/../x",
    "a/./x",
    "a/x",
    "a//x",
    "a/x/",
    "x.",
    "x..",
    "x:",
    "x@",
]


async def test_look_alike_ids_never_share_state_or_a_directory(data_dir: Path) -> None:
    async with running_node(data_dir) as node:
        client = await TcpProbe.welcomed(node)
        for index, agent in enumerate(LOOK_ALIKES):
            seen = await client.call(agent, "put", "who", index, cls="Register")
            assert seen == Seen(result=None), (agent, seen)
        for index, agent in enumerate(LOOK_ALIKES):
            assert await client.call(agent, "get", "who") == Seen(result=index), agent
        assert await client.call("c", "get") == Seen(result=1)  # the Counter made at start
        directories = {FacetAddress("acme", agent).relative_path() for agent in LOOK_ALIKES}
        assert len(directories) == len(LOOK_ALIKES)
        for directory in directories:
            assert (data_dir / directory / "data.mdb").is_file()
            assert ".." not in directory.parts
        # The same ids over HTTP reach the same facets (the path is not normalised).
        for index, agent in enumerate(LOOK_ALIKES[:12]):
            path = f"/v1/facets/acme/{agent}/get"
            answer = await http_seen(
                node, http_request(path, node.keys["acme"], b'{"args": ["who"]}')
            )
            assert answer.result == index, (agent, answer)


async def test_the_same_agent_id_of_two_tenants_is_two_facets(data_dir: Path) -> None:
    async with running_node(data_dir) as node:
        globex = await TcpProbe.welcomed(node, "globex")
        assert await globex.call("c", "increment", cls="Counter") == Seen(result=1)
        assert await globex.call("c", "increment") == Seen(result=2)
        acme = await TcpProbe.welcomed(node)
        assert await acme.call("c", "get") == Seen(result=1)
        ours = FacetAddress("acme", "c").relative_path()
        theirs = FacetAddress("globex", "c").relative_path()
        assert ours.parts[1] != theirs.parts[1]  # different tenant directories


async def test_the_largest_ids_keys_and_frames_are_accepted(data_dir: Path) -> None:
    async with running_node(data_dir) as node:
        client = await TcpProbe.welcomed(node)
        longest = "a" * 255 + "z"
        assert await client.call(longest, "increment", cls="Counter") == Seen(result=1)
        path = f"/v1/facets/acme/{longest}/increment"
        answer = await http_seen(node, http_request(path, node.keys["acme"], None))
        assert answer.result == 2
        key = "k" * 256
        first = await client.call("c", "increment", idempotency_key=key)
        assert first == await client.call("c", "increment", idempotency_key=key) == Seen(result=2)
        # A frame of exactly frame_bytes_max (padded with a field the server ignores).
        call = {"t": "call", "id": 99, "agent": "c", "method": "get", "args": [], "kwargs": {}}
        pad = frame_filler(call, "pad")
        assert await client.send_body({**call, "pad": pad}) == Seen(result=2)
        # A body of exactly http_body_bytes_max.
        body = b'{"args": ["k", "' + b"v" * 1000 + b'"], "class": "Register"}'
        body += b" " * (BODY_BYTES_MAX - len(body))
        answer = await http_seen(
            node, http_request("/v1/facets/acme/r/put", node.keys["acme"], body)
        )
        assert (answer.status, answer.result) == (200, None)
        tenant = "t" * 63
        payload = json.dumps({"tenant": tenant}).encode()
        created = await http_seen(node, http_request("/v1/admin/tenants", node.admin_key, payload))
        assert created.status == 201


async def test_an_http_connection_that_ends_without_a_request_frees_its_slot(
    data_dir: Path,
) -> None:
    """hypercorn keeps a connection's task until its keep-alive timer fires when no request
    came; the gateway stops that timer when the connection ends, so a client cannot hold
    connection slots with connections it already closed (regression)."""
    async with running_node(data_dir, **{"server.http_keep_alive_seconds": 600.0}) as node:
        for _ in range(3):
            stream = await node.http()
            await wait_until(lambda: node.connections_open("http") == 1)
            await stream.aclose()
            await wait_until(lambda: node.connections_open("http") == 0)
        # A malformed head: hypercorn answers 400 and closes; the slot is free again.
        stream = await node.http()
        await stream.send_all(b"NOT HTTP\r\n\r\n")
        with trio.fail_after(10):
            assert b" 400 " in await stream.receive_some(65536)
        await wait_until(lambda: node.connections_open("http") == 0)
