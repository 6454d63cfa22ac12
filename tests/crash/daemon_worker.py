"""A client process of the daemon crash loop: calls until paused, recording every outcome.

    python -m tests.crash.daemon_worker LIN_SPEC_JSON CRASH_SPEC_JSON

Its parent (``tests/crash/daemon.py``) drives it with one line at a time on stdin: ``go`` (start
calling), ``pause`` (stop once the call in flight has an outcome), ``stop`` (exit). It answers
on stdout: ``ready`` once started, ``paused`` once it has stopped calling and every outcome is
written down.

Calls, one at a time on one connection (``facetrt.client.connect``, ``retries=0``), through the
linearizability worker's machinery (``tests/lin/worker.py``: deadlines, injected drops, a new
process id after each unknown outcome):

* register and counter operations (``reg-*``, ``ctr-*``), recorded as that worker records them
  (:class:`tests.lin.checker.Operation` JSON lines in the lin spec's ``output``);
* ``append_turn`` on ``AgentMemory`` facets (``mem-*``) with a unique text, ``set`` of a timer
  with a unique name and a short delay on ``Alarm`` facets (``alarm-*``), and ``increment`` on
  a fresh ``Counter`` facet (a new store, so that kills land in store creation too), recorded as
  :class:`CallRecord` JSON lines in ``CRASH_SPEC.records``.

A call's record is written (and flushed) once its outcome is known, before the next call starts;
the parent reads the records only while the worker is paused, so it always sees all of them.
The worker is never killed (only the daemon is), so what it wrote reaches the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from tests.lin.worker import Worker, WorkerSpec

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator
    from typing import TextIO

    from facetrt import Value
    from facetrt.client import AsyncClient

GO: Final = "go"
PAUSE: Final = "pause"
STOP: Final = "stop"
READY: Final = "ready"
PAUSED: Final = "paused"
MEMORY_PREFIX: Final = "mem-"
ALARM_PREFIX: Final = "alarm-"
FRESH_PREFIX: Final = "fresh-"
ROLE: Final = "user"


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashSpec:
    """What a crash-loop worker does besides the linearizability worker's calls."""

    records: str  # where CallRecords go
    memory_facets: list[str]
    alarm_facets: list[str]
    append_fraction: float
    timer_fraction: float
    fresh_fraction: float
    timer_delay_max_seconds: float

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_json(cls, text: str) -> CrashSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecord:
    """One call that is not a register or counter operation, and its outcome."""

    process_id: int
    facet: str
    method: str
    args: list[Value]
    result: Value  # None when the outcome is unknown
    invoke_seconds: float
    complete_seconds: float | None  # None: no reply, the outcome is unknown

    @property
    def is_known(self) -> bool:
        return self.complete_seconds is not None

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_json(cls, text: str) -> CallRecord:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


class CrashWorker:
    """Random calls of every kind until paused; see the module docstring."""

    def __init__(self, lin: Worker, spec: CrashSpec, records: TextIO) -> None:
        self.lin = lin
        self.spec = spec
        self.records = records
        self.sequence = 0
        self.pausing = False

    async def serve(self) -> None:
        """Follow the parent's commands until ``stop``."""
        async with (
            trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin,
            trio.lowlevel.FdStream(os.dup(sys.stdout.fileno())) as stdout,
            contextlib.AsyncExitStack() as stack,
        ):
            commands = await stack.enter_async_context(contextlib.aclosing(_lines(stdin)))
            await stdout.send_all(f"{READY}\n".encode())
            command = await anext(commands)
            while command == GO:
                self.pausing = False
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._wait_pause, commands)
                    await self._run_until_paused()
                await stdout.send_all(f"{PAUSED}\n".encode())
                command = await anext(commands)
            assert command == STOP, f"unexpected command {command!r}"

    async def _wait_pause(self, commands: AsyncIterator[str]) -> None:
        command = await anext(commands)
        assert command in (PAUSE, STOP), f"unexpected command {command!r}"
        self.pausing = True

    async def _run_until_paused(self) -> None:
        while not self.pausing:
            async with contextlib.AsyncExitStack() as stack:
                client = await self.lin.connect(stack, stop=lambda: self.pausing)
                while client is not None and not self.pausing:
                    if not await self._step(client):
                        break
            # A new connection is a new process id (needed after an unknown outcome).
            self.lin.generation += 1

    async def _step(self, client: AsyncClient) -> bool:
        """One random call; False when the connection is done."""
        spec, rng = self.spec, self.lin.rng
        choice = rng.random()
        if choice < spec.fresh_fraction:
            facet = f"{FRESH_PREFIX}{self.lin.spec.index}-{self._next()}"
            return await self._call(client, facet, "increment", [rng.randint(1, 1000)], "Counter")
        choice -= spec.fresh_fraction
        if choice < spec.append_fraction:
            facet = rng.choice(spec.memory_facets)
            text = f"w{self.lin.spec.index}.{self._next()}"
            return await self._call(client, facet, "append_turn", [ROLE, text], "AgentMemory")
        choice -= spec.append_fraction
        if choice < spec.timer_fraction:
            facet = rng.choice(spec.alarm_facets)
            name = f"w{self.lin.spec.index}.{self._next()}"
            delay = rng.uniform(0, spec.timer_delay_max_seconds)
            return await self._call(client, facet, "set", [name, None, delay], "Alarm")
        return await self.lin.make(client, self.lin.plan())

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    async def _call(
        self, client: AsyncClient, facet: str, method: str, args: list[Value], cls: str
    ) -> bool:
        outcome = await self.lin.attempt(client, facet, method, tuple(args), cls)
        if not outcome.refused:
            record = CallRecord(
                process_id=self.lin.process_id,
                facet=facet,
                method=method,
                args=args,
                result=outcome.result,
                invoke_seconds=outcome.invoke_seconds,
                complete_seconds=outcome.complete_seconds,
            )
            self.records.write(record.to_json() + "\n")
            self.records.flush()
        return outcome.connection_usable


async def _lines(stream: trio.lowlevel.FdStream) -> AsyncGenerator[str, None]:
    buffer = b""
    while True:
        line, newline, rest = buffer.partition(b"\n")
        if newline:
            buffer = rest
            yield line.decode()
            continue
        data = await stream.receive_some()
        if not data:
            # The parent went away: behave as if told to stop, whatever is asked next.
            while True:
                yield STOP
        buffer += data


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m tests.crash.daemon_worker LIN_SPEC_JSON CRASH_SPEC\n")
        return 2
    lin_spec = WorkerSpec.from_json(argv[0])
    spec = CrashSpec.from_json(argv[1])
    with (
        Path(lin_spec.output).open("a") as out,
        Path(spec.records).open("a") as records,
    ):
        trio.run(CrashWorker(Worker(lin_spec, out), spec, records).serve)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
