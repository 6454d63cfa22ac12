"""Instructions per call under callgrind: a deterministic A/B measure for the call path.

Wall-clock figures on a shared 2-vCPU VM move by ±10 % between runs; the number of
instructions a call costs does not (±0.1 % here). Each case runs a fixed amount of work twice
under ``valgrind --tool=callgrind`` (Debian ``valgrind``), with ``SMALL`` and ``LARGE`` calls,
and reports ``(instructions(LARGE) - instructions(SMALL)) / (LARGE - SMALL)``: start-up,
imports and shutdown cancel out. User-space instructions only (the kernel is not counted),
all threads of the process.

    python -m benchmarks.icount                 # every case (~2 min)
    python -m benchmarks.icount runtime tcp     # some cases

Cases (run as ``python -m benchmarks.icount --child CASE N``):
- ``runtime``: ``RuntimeCore.submit`` with a reply callback, 100 calls at a time to one
  ``Counter``, commits on the writer threads: the server's path without sockets.
- ``tcp``: the daemon in-process (``Daemon``, ``tune_gc=True``) and a minimal pipelined client
  on loopback, 128 calls in flight, client included.
- ``tcp1``: the same with one call in flight (P2's shape).
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import trio

CASES = {"runtime": (100, 5100), "tcp": (200, 5200), "tcp1": (100, 1100)}


async def _runtime_case(total: int) -> None:
    from facetrt import RuntimeConfig, open_runtime
    from facetrt.examples import Counter

    config = RuntimeConfig(commit_inline_when_idle=False)
    with tempfile.TemporaryDirectory() as tmp:
        async with open_runtime(tmp, classes={"Counter": Counter}, config=config) as rt:
            core = rt.core
            address = core.address_of("t", "c1")
            await rt.call("t", "c1", "increment", cls="Counter")
            done = target = 0
            lot = trio.lowlevel.ParkingLot()

            def answered(_: object) -> None:
                nonlocal done
                done += 1
                if done == target:  # wake the driver once per batch, not once per reply
                    lot.unpark_all()

            for _ in range(total // 100):
                now = trio.current_time()
                for _ in range(100):
                    core.submit(
                        address,
                        "increment",
                        [],
                        {},
                        cls="Counter",
                        idempotency_key=None,
                        chain=(),
                        callback=answered,
                        enqueued_at=now,
                    )
                target = done + 100
                while done < target:
                    await lot.park()


async def _tcp_case(total: int, window: int) -> None:
    from facetrt.config import load_daemon_config
    from facetrt.protocol import Connection, Hello, NeedData, Role
    from facetrt.server._daemon import Daemon
    from facetrt.storage import SystemStore

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        system = SystemStore(data / "system")
        system.create_tenant("t")
        key = system.create_key("t")[1]
        system.close()
        overrides = {"data_dir": str(data), "server.listen": "127.0.0.1:0", "server.http": ""}
        daemon = Daemon(load_daemon_config(overrides=overrides), tune_gc=True)
        async with trio.open_nursery() as nursery:
            info = await nursery.start(daemon.run)
            stream = await trio.open_tcp_stream(*info.tcp_address)
            conn = Connection(Role.CLIENT)
            await stream.send_all(conn.send(Hello(key=key)))
            while isinstance(conn.next_event(), NeedData):
                conn.receive_data(await stream.receive_some(1 << 16))
            next_id = 0

            def call() -> bytes:
                nonlocal next_id
                next_id += 1
                body = {
                    "t": "call",
                    "id": next_id,
                    "agent": "c",
                    "method": "increment",
                    "args": [],
                    "kwargs": {},
                    "class": "Counter",
                }
                payload = msgpack.packb(body)
                return struct.pack(">I", len(payload)) + payload

            buffer = bytearray()
            sent = min(window, total)
            await stream.send_all(b"".join(call() for _ in range(sent)))
            done = 0
            while done < total:
                buffer += await stream.receive_some(1 << 16)
                offset = 0
                while len(buffer) - offset >= 4:
                    (length,) = struct.unpack_from(">I", buffer, offset)
                    if len(buffer) - offset - 4 < length:
                        break
                    offset += 4 + length
                    done += 1
                del buffer[:offset]
                more = min(done + window, total) - sent
                if more > 0:
                    await stream.send_all(b"".join(call() for _ in range(more)))
                    sent += more
            await stream.aclose()
            daemon.stop()


def _child(case: str, total: int) -> None:
    if case == "runtime":
        trio.run(_runtime_case, total)
    else:
        trio.run(_tcp_case, total, 128 if case == "tcp" else 1)


def _instructions(case: str, total: int) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, "-m", "benchmarks.icount", "--child", case, str(total)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    match = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.icount",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cases", nargs="*", choices=[*CASES, []], default=[])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found (apt-get install valgrind)")
        return 1
    for case in args.cases or list(CASES):
        small, large = CASES[case]
        per_call = (_instructions(case, large) - _instructions(case, small)) / (large - small)
        print(f"{case:8} {per_call:>10,.0f} instructions/call", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
