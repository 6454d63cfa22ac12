"""The separate processes of ``benchmarks.daemon``: the echo server and the load generator.

    python -m benchmarks._daemon_util echo          # prints "echo serving: tcp://HOST:PORT"
    python -m benchmarks._daemon_util generate      # JSON lines: one spec in, one result out

**Echo server**: a bare trio TCP server speaking the daemon's framing (``FrameDecoder`` and
``encode_frame`` of ``facetrt.protocol``, the code the daemon decodes and encodes frames with):
``hello`` is answered with ``welcome``, every ``call`` with a ``result`` of the same id holding
an incremented integer; every reply to the frames of one read goes out in one ``send_all``. No
runtime, no storage: what the framing, msgpack and trio's socket I/O cost on their own.

**Load generator**: reads one JSON spec per line on stdin, runs it, writes one JSON result per
line on stdout. Kinds:

- ``raw``: a minimal pipelined client per connection, one trio task each: ``hello``, then
  ``window`` calls in flight, kept there by sending one new call per reply; every call frame of
  one read goes out in one ``send_all`` (coalesced writes). Frames are built from a template
  checked byte for byte against ``encode_frame``; replies are decoded with ``msgpack.unpackb``.
- ``client``: the ``facetrt.client`` async client, one per connection, with ``window`` tasks
  calling ``await client.call(...)`` in a loop.

Both run ``warmup_s`` unmeasured, then ``seconds`` measured (replies received in the window
count), then stop sending and wait for every call in flight, so that ``acknowledged`` counts
every call that got a result. CPU time of the server process (and of its main thread, the trio
loop) is read from ``/proc`` at the window's edges, as is the generator's own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from facetrt import FacetrtError
from facetrt.client import connect
from facetrt.protocol import FrameDecoder, encode_frame

if TYPE_CHECKING:
    from collections.abc import Callable

HEADER: Final = struct.Struct(">I")
RECEIVE_BYTES_MAX: Final = 64 * 1024  # as the daemon's TCP surface reads
ECHO_INFLIGHT: Final = 256  # what the echo server's welcome announces (the daemon's default)
ECHO_FRAME_BYTES: Final = 4 * 1024 * 1024
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


# -- CPU time from /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of process ``pid`` (or only its thread ``tid``), in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return math.nan
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14, 15


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot, all CPUs (``/proc/stat``)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass(slots=True)
class CpuMark:
    """CPU times of the server process, its main (trio) thread, and this process."""

    server: float
    server_loop: float
    own: float

    @classmethod
    def take(cls, server_pid: int | None) -> CpuMark:
        if server_pid is None:
            server = server_loop = math.nan
        else:
            server = cpu_seconds(server_pid)
            server_loop = cpu_seconds(server_pid, server_pid)
        return cls(server, server_loop, time.process_time())


# -- the echo server -------------------------------------------------------------------------


async def _echo_session(stream: trio.SocketStream) -> None:
    decoder = FrameDecoder(ECHO_FRAME_BYTES)
    counter = 0
    async with stream:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_BYTES_MAX)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            decoder.feed(data)
            replies: list[bytes] = []
            closing = False
            while (body := decoder.next_body()) is not None:
                kind = body.get("t")
                if kind == "call":
                    counter += 1
                    replies.append(
                        encode_frame({"t": "result", "id": body["id"], "value": counter})
                    )
                elif kind == "hello":
                    welcome = {
                        "t": "welcome",
                        "v": 1,
                        "tenant": "echo",
                        "inflight": ECHO_INFLIGHT,
                        "frame": ECHO_FRAME_BYTES,
                    }
                    replies.append(encode_frame(welcome))
                elif kind == "bye":
                    replies.append(encode_frame({"t": "bye"}))
                    closing = True
            if replies:
                try:
                    await stream.send_all(b"".join(replies))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if closing:
                return


async def _echo_main() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    sys.stdout.write(f"echo serving: tcp://{host}:{port}\n")
    sys.stdout.flush()
    await trio.serve_listeners(_echo_session, listeners)


# -- the load generator ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """One measured run of the generator."""

    kind: str  # "raw" or "client"
    host: str
    port: int
    key: str
    agent: str
    connections: int
    window: int  # calls in flight per connection
    warmup_s: float
    seconds: float
    server_pid: int | None
    retries: int = 3  # the client's (its default): with retries on, every call carries an idem key
    agents: int = 1  # raw: >1 spreads each connection's calls over agent-0 .. agent-(N-1)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        return cls(**data)


@dataclass(slots=True)
class _Run:
    """What the connections of one run share."""

    spec: Spec
    measure_from: float
    measure_until: float
    latencies_us: list[int] = field(default_factory=list)
    calls: int = 0  # results received inside the measured window
    acknowledged: int = 0  # results received at any time
    errors: Tally[str] = field(default_factory=Tally)

    def stopped(self, now: float) -> bool:
        return now >= self.measure_until


def _call_template(agent: str) -> tuple[bytes, bytes]:
    """The call body, without its trailing ``id`` entry, and the ``id`` key, msgpack-encoded."""
    head = {"t": "call", "agent": agent, "method": "increment", "args": [], "kwargs": {}}
    head["class"] = "Counter"
    entries = b"".join(
        msgpack.packb(key) + msgpack.packb(value, use_bin_type=True) for key, value in head.items()
    )
    return bytes([0x80 | (len(head) + 1)]) + entries, msgpack.packb("id")


def _frame_maker(agent: str) -> Callable[[int], bytes]:
    prefix, id_key = _call_template(agent)
    pack_header = HEADER.pack
    packb = msgpack.packb

    def frame(call_id: int) -> bytes:
        body = prefix + id_key + packb(call_id)
        return pack_header(len(body)) + body

    # The template must be exactly what facetrt's own encoder produces for the same body.
    sample: dict[str, object] = {"t": "call", "agent": agent, "method": "increment"}
    sample.update({"args": [], "kwargs": {}, "class": "Counter", "id": 2**40})
    assert frame(2**40) == encode_frame(sample), "call template differs from encode_frame"
    return frame


async def _handshake(stream: trio.SocketStream, key: str) -> bytearray:
    """Send ``hello``, wait for ``welcome``; return the bytes read after it."""
    await stream.send_all(encode_frame({"t": "hello", "v": 1, "key": key}))
    buffer = bytearray()
    while True:
        if len(buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer)
            if len(buffer) >= HEADER.size + length:
                body = msgpack.unpackb(bytes(buffer[HEADER.size : HEADER.size + length]))
                if body.get("t") != "welcome":
                    raise RuntimeError(f"handshake refused: {body!r}")
                return buffer[HEADER.size + length :]
        data = await stream.receive_some(RECEIVE_BYTES_MAX)
        if not data:
            raise RuntimeError("the server closed the connection during the handshake")
        buffer += data


async def _raw_connection(run: _Run, first_id: int) -> None:
    spec = run.spec
    stream = await trio.open_tcp_stream(spec.host, spec.port)  # TCP_NODELAY is set by trio
    async with stream:
        buffer = await _handshake(stream, spec.key)
        frame = _frame_maker(spec.agent)
        if spec.agents > 1:  # round-robin over the agents, by call id
            makers = [_frame_maker(f"{spec.agent}-{index}") for index in range(spec.agents)]
            count = len(makers)

            def frame(call_id: int) -> bytes:
                return makers[call_id % count](call_id)

        clock = time.perf_counter
        unpack_header = HEADER.unpack_from
        unpackb = msgpack.unpackb
        sent_at: dict[int, float] = {}
        next_id = first_id
        latencies = run.latencies_us
        errors = run.errors

        now = clock()
        frames: list[bytes] = []
        for _ in range(spec.window):
            frames.append(frame(next_id))
            sent_at[next_id] = now
            next_id += 1
        await stream.send_all(b"".join(frames))
        while sent_at:
            data = await stream.receive_some(RECEIVE_BYTES_MAX)
            if not data:
                raise RuntimeError(
                    f"the server closed the connection with {len(sent_at)} in flight"
                )
            now = clock()
            buffer += data
            measured = run.measure_from <= now < run.measure_until
            stopping = now >= run.measure_until
            offset = 0
            available = len(buffer)
            frames = []
            while available - offset >= 4:
                (length,) = unpack_header(buffer, offset)
                end = offset + 4 + length
                if end > available:
                    break
                body = unpackb(buffer[offset + 4 : end])
                offset = end
                started = sent_at.pop(body["id"])
                if body["t"] == "result":
                    run.acknowledged += 1
                    if measured:
                        run.calls += 1
                        latencies.append(round((now - started) * 1e6))
                else:
                    errors[str(body.get("code"))] += 1
                if not stopping:
                    frames.append(frame(next_id))
                    sent_at[next_id] = now
                    next_id += 1
            del buffer[:offset]
            if frames:
                await stream.send_all(b"".join(frames))
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(encode_frame({"t": "bye"}))


async def _client_connection(run: _Run) -> None:
    spec = run.spec
    url = f"tcp://{spec.host}:{spec.port}"
    async with connect(url, key=spec.key, retries=spec.retries) as client:

        async def caller() -> None:
            clock = time.perf_counter
            while (started := clock()) < run.measure_until:
                try:
                    await client.call(spec.agent, "increment", cls="Counter")
                except FacetrtError as exc:
                    run.errors[exc.code.value] += 1
                    continue
                now = clock()
                run.acknowledged += 1
                if run.measure_from <= now < run.measure_until:
                    run.calls += 1
                    run.latencies_us.append(round((now - started) * 1e6))

        async with trio.open_nursery() as nursery:
            for _ in range(spec.window):
                nursery.start_soon(caller)


async def _generate(spec: Spec) -> dict[str, Any]:
    started = time.perf_counter()
    run = _Run(spec, started + spec.warmup_s, started + spec.warmup_s + spec.seconds)
    marks: list[tuple[float, CpuMark]] = []

    async def meter() -> None:
        for edge in (run.measure_from, run.measure_until):
            await trio.sleep(max(0.0, edge - time.perf_counter()))
            marks.append((time.perf_counter(), CpuMark.take(spec.server_pid)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meter)
        for index in range(spec.connections):
            if spec.kind == "raw":
                nursery.start_soon(_raw_connection, run, 1 + index * 2**40)
            elif spec.kind == "client":
                nursery.start_soon(_client_connection, run)
            else:
                raise ValueError(f"unknown kind {spec.kind!r}")
    (begin, before), (end, after) = marks
    return {
        "calls": run.calls,
        "elapsed_s": end - begin,
        "acknowledged": run.acknowledged,
        "errors": dict(run.errors),
        "latencies_us": run.latencies_us,
        "server_cpu_s": after.server - before.server,
        "server_loop_cpu_s": after.server_loop - before.server_loop,
        "generator_cpu_s": after.own - before.own,
    }


def _generator_main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = Spec.from_json(json.loads(line))
        result = trio.run(_generate, spec)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    if argv == ["echo"]:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_echo_main)
        return 0
    if argv == ["generate"]:
        _generator_main()
        return 0
    sys.stderr.write("usage: python -m benchmarks._daemon_util echo|generate\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
