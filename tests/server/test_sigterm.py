"""SIGTERM under load: the daemon drains, exits 0, and loses no acknowledged call.

Runs the real ``facetrt serve`` command in a child process and drives it with the Python
client from this process over loopback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from facetrt import FacetrtError
from facetrt.client import connect
from facetrt.storage import SystemStore

if TYPE_CHECKING:
    from pathlib import Path

SERVING = re.compile(rb"protocol tcp://127\.0\.0\.1:(\d+)")


async def _start_daemon(data_dir: Path) -> tuple[trio.Process, int]:
    command = [sys.executable, "-m", "facetrt", "--log-level", "WARNING", "serve"]
    command += ["--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--http", ""]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stdout is not None
    output = b""
    with trio.fail_after(30):
        while (match := SERVING.search(output)) is None:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"daemon exited early: {output!r}"
            output += chunk
    return process, int(match.group(1))


@pytest.mark.slow
async def test_sigterm_under_load_loses_no_acknowledged_call(data_dir: Path) -> None:
    system = SystemStore(data_dir / "system")
    system.create_tenant("acme")
    _, key = system.create_key("acme")
    system.close()

    process, port = await _start_daemon(data_dir)
    acknowledged: dict[str, int] = {}
    refused = 0

    async def worker(agent: str) -> None:
        nonlocal refused
        async with connect(f"tcp://127.0.0.1:{port}", key=key, retries=0) as client:
            while True:
                try:
                    value = await client.call(agent, "increment", cls="Counter")
                except FacetrtError:
                    refused += 1
                    return
                assert isinstance(value, int)
                acknowledged[agent] = max(acknowledged.get(agent, 0), value)

    async with trio.open_nursery() as nursery:
        for index in range(8):
            nursery.start_soon(worker, f"c{index}")
        with trio.fail_after(30):
            while sum(acknowledged.values()) < 500:
                await trio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    assert refused == 8  # every worker saw the drain as an error, none hung

    process, port = await _start_daemon(data_dir)
    try:
        async with connect(f"tcp://127.0.0.1:{port}", key=key) as client:
            for agent, value in acknowledged.items():
                stored = await client.call(agent, "get")
                assert isinstance(stored, int)
                assert stored >= value, (agent, stored, value)
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
