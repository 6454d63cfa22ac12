"""One client process of the linearizability recorder: random register and counter calls.

    python -m tests.lin.worker SPEC_JSON

Reads a :class:`WorkerSpec` (JSON, one argument), connects to the daemon with
``facetrt.client.connect`` (``retries=0``: a retry would hide an outcome and, with an idempotency
key, merge two operations into one), and performs ``spec.operations`` calls one at a time, each
written as one JSON line to ``spec.output`` (see :func:`operation_to_json`) as soon as it is known.

Every call has a deadline. Some calls get a very short one (``short_deadline_fraction``), and for
some (``drop_fraction``) a concurrent task closes the connection after a random delay: both are
how unknown outcomes really occur. A call that did not return a result is recorded with
``complete_seconds=None`` (unknown) unless the daemon said ``overloaded``, which it only says
before the handler runs (then the call is left out: it did not happen). After an unknown
outcome, or whenever the connection is given up, the worker continues on a new connection under a
new process id, as the checker requires (a process issues nothing after an unknown outcome).

Timestamps are ``time.monotonic()``, which on Linux is one system-wide clock (CLOCK_MONOTONIC),
so the intervals of different worker processes are comparable.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import anyio
import trio

from facetrt import FacetrtError, OverloadedError
from facetrt.client import connect
from tests.lin.checker import Operation, OpKind
from tests.lin.checker import Value as ModelValue

if TYPE_CHECKING:
    from collections.abc import Callable

    from facetrt import Value
    from facetrt.client import AsyncClient

# Process ids of worker ``i`` are i * PROCESS_STRIDE + generation: unique across workers.
PROCESS_STRIDE: Final = 1_000_000
REGISTER_PREFIX: Final = "reg-"  # agent ids of Register facets; the rest are Counters
COUNTER_KEY: Final = "count"  # the one key of a Counter facet, as its partition names it
AMOUNT_MAX: Final = 1_000_000
# Connecting again while the daemon restarts: how long to keep trying, and how often.
RECONNECT_SECONDS: Final = 30.0
RECONNECT_PAUSE_SECONDS: Final = 0.02


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """What one worker process does."""

    index: int
    url: str
    key: str
    output: str
    seed: int
    operations: int
    register_facets: list[str]
    register_keys: list[str]
    counter_facets: list[str]
    deadline_seconds: float  # every call's: no call waits forever
    short_deadline_fraction: float
    short_deadline_seconds: tuple[float, float]  # drawn uniformly in this range
    drop_fraction: float
    drop_after_seconds: tuple[float, float]
    # Rotate to fresh facets every this many seconds of the shared clock since ``epoch``
    # (facet names get a ".<round>" suffix); None: the same facets all run long.
    round_seconds: float | None
    epoch: float

    def to_json(self) -> str:
        data: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        data["short_deadline_seconds"] = tuple(data["short_deadline_seconds"])
        data["drop_after_seconds"] = tuple(data["drop_after_seconds"])
        return cls(**data)


def operation_to_json(op: Operation) -> str:
    return json.dumps(
        {
            "process_id": op.process_id,
            "facet": op.facet,
            "key": op.key,
            "kind": op.kind.value,
            "argument": op.argument,
            "expected": op.expected,
            "result": op.result,
            "invoke_seconds": op.invoke_seconds,
            "complete_seconds": op.complete_seconds,
            "no_effect_after_seconds": op.no_effect_after_seconds,
        }
    )


def operation_from_json(text: str) -> Operation:
    data = json.loads(text)
    data["kind"] = OpKind(data["kind"])
    return Operation(**data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """One call to make, and the operation it records."""

    facet: str
    key: str
    kind: OpKind
    method: str
    args: tuple[Value, ...]
    argument: ModelValue = None
    expected: ModelValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What became of one call: a result, an unknown outcome, or a refusal."""

    result: Value
    invoke_seconds: float
    complete_seconds: float | None  # None: no reply, the outcome is unknown
    refused: bool  # ``overloaded``: refused before the handler ran, so it did not happen
    dropped: bool  # the connection was closed on purpose during the call

    @property
    def connection_usable(self) -> bool:
        """Whether the same connection and process id may make the next call."""
        return (self.complete_seconds is not None or self.refused) and not self.dropped


class Worker:
    """Random register and counter calls, each recorded as one JSON line on ``out``."""

    def __init__(self, spec: WorkerSpec, out: TextIO) -> None:
        self.spec = spec
        self.out = out
        self.rng = random.Random(spec.seed)
        self.generation = 0
        self.sequence = 0
        # The last value this worker saw in each register: a cas expecting it often swaps.
        self.seen: dict[tuple[str, str], ModelValue] = {}

    @property
    def process_id(self) -> int:
        return self.spec.index * PROCESS_STRIDE + self.generation

    def plan(self) -> Plan:
        rng, spec = self.rng, self.spec
        # Half counters, half registers, however many facets and keys each has.
        if spec.counter_facets and (not spec.register_facets or rng.random() < 0.5):
            facet = self._rotated(rng.choice(spec.counter_facets))
            if rng.random() < 0.4:
                return Plan(facet=facet, key=COUNTER_KEY, kind=OpKind.READ, method="get", args=())
            # Large random amounts play the part of unique values: a total then names the set of
            # increments it contains, so unknown outcomes (1 + 2 or 3?) are resolved at the next
            # known total instead of staying ambiguous, and a wrong total cannot be explained
            # by a swapped order.
            amount = rng.randint(1, AMOUNT_MAX)
            return Plan(
                facet=facet,
                key=COUNTER_KEY,
                kind=OpKind.INCREMENT,
                method="increment",
                args=(amount,),
                argument=amount,
            )
        facet = self._rotated(rng.choice(spec.register_facets))
        key = rng.choice(spec.register_keys)
        choice = rng.random()
        if choice < 0.4:
            return Plan(facet=facet, key=key, kind=OpKind.READ, method="get", args=(key,))
        # Unique values: a read names the one write it saw, which keeps the search small.
        self.sequence += 1
        value = f"p{self.process_id}.{self.sequence}"
        if choice < 0.75:
            return Plan(
                facet=facet,
                key=key,
                kind=OpKind.WRITE,
                method="put",
                args=(key, value),
                argument=value,
            )
        expected = self.seen.get((facet, key))
        return Plan(
            facet=facet,
            key=key,
            kind=OpKind.CAS,
            method="cas",
            args=(key, expected, value),
            argument=value,
            expected=expected,
        )

    def _rotated(self, facet: str) -> str:
        # Optional: fresh facets every round keep partitions short. An unknown outcome whose
        # no-effect-after time is not known stays a candidate to the end of its partition.
        if self.spec.round_seconds is None:
            return facet
        return f"{facet}.{int((time.monotonic() - self.spec.epoch) // self.spec.round_seconds)}"

    async def run(self) -> None:
        done = 0
        while done < self.spec.operations:
            async with contextlib.AsyncExitStack() as stack:
                client = await self.connect(stack)
                assert client is not None
                while done < self.spec.operations:
                    done += 1
                    if not await self.make(client, self.plan()):
                        break
            self.generation += 1

    async def connect(
        self, stack: contextlib.AsyncExitStack, *, stop: Callable[[], bool] = lambda: False
    ) -> AsyncClient | None:
        """Connect (``retries=0``), trying again while the daemon restarts; None once ``stop()``.

        Raises:
            FacetrtError, OSError: still no connection after ``RECONNECT_SECONDS``.
        """
        give_up = time.monotonic() + RECONNECT_SECONDS
        while not stop():
            try:
                return await stack.enter_async_context(
                    connect(self.spec.url, key=self.spec.key, retries=0)
                )
            except (FacetrtError, OSError):
                if time.monotonic() >= give_up:
                    raise
            await trio.sleep(RECONNECT_PAUSE_SECONDS)
        return None

    async def make(self, client: AsyncClient, plan: Plan) -> bool:
        """Make one planned call and record it; False when this connection and process id are
        done."""
        cls = "Register" if plan.facet.startswith(REGISTER_PREFIX) else "Counter"
        outcome = await self.attempt(client, plan.facet, plan.method, plan.args, cls)
        if outcome.refused:
            return outcome.connection_usable
        op = Operation(
            process_id=self.process_id,
            facet=plan.facet,
            key=plan.key,
            kind=plan.kind,
            argument=plan.argument,
            expected=plan.expected,
            result=_model_value(outcome.result) if outcome.complete_seconds is not None else None,
            invoke_seconds=outcome.invoke_seconds,
            complete_seconds=outcome.complete_seconds,
        )
        self.out.write(operation_to_json(op) + "\n")
        self.out.flush()
        if outcome.complete_seconds is not None:
            self._remember(plan, outcome.result)
        return outcome.connection_usable

    async def attempt(
        self, client: AsyncClient, facet: str, method: str, args: tuple[Value, ...], cls: str
    ) -> Outcome:
        """Call with the deadline and the faults the spec asks for; say what became of it.

        Raises:
            FacetrtError: a failure that is not retryable (handler_error, bad_request...): not
                a fault this run injects but a bug, so it is not hidden as an unknown outcome.
        """
        spec, rng = self.spec, self.rng
        deadline = spec.deadline_seconds
        if rng.random() < spec.short_deadline_fraction:
            deadline = rng.uniform(*spec.short_deadline_seconds)
        drop_after = None
        if rng.random() < spec.drop_fraction:
            drop_after = rng.uniform(*spec.drop_after_seconds)
        result: Value = None
        complete: float | None = None
        refused = False
        async with trio.open_nursery() as nursery:
            if drop_after is not None:
                nursery.start_soon(_drop_after, client, drop_after)
            invoke = time.monotonic()
            try:
                result = await client.call(facet, method, *args, cls=cls, deadline_seconds=deadline)
                complete = time.monotonic()
            except OverloadedError:
                refused = True  # refused before the handler ran: the call did not happen
            except FacetrtError as exc:
                # Retryable: timeout, unavailable (connection dropped, daemon killed), internal:
                # it may or may not have run.
                if not exc.retryable:
                    raise
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                pass  # the client closed by the drop task, or the socket broke: unknown too
            nursery.cancel_scope.cancel()
        return Outcome(
            result=result,
            invoke_seconds=invoke,
            complete_seconds=complete,
            refused=refused,
            dropped=drop_after is not None,
        )

    def _remember(self, plan: Plan, result: Value) -> None:
        where = (plan.facet, plan.key)
        if plan.kind is OpKind.READ and plan.facet.startswith(REGISTER_PREFIX):
            self.seen[where] = _model_value(result)
        elif plan.kind is OpKind.WRITE or (plan.kind is OpKind.CAS and result is True):
            self.seen[where] = plan.argument


def _model_value(value: Value) -> ModelValue:
    # The handlers only ever store and return these; anything else is a bug worth stopping for.
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    raise TypeError(f"a register or counter returned {value!r}")


async def _drop_after(client: AsyncClient, seconds: float) -> None:
    # close_nowait fails the calls in flight and closes the socket: the daemon sees the
    # connection drop, possibly while it runs the handler.
    await trio.sleep(seconds)
    client.close_nowait()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m tests.lin.worker SPEC_JSON\n")
        return 2
    spec = WorkerSpec.from_json(argv[0])
    with Path(spec.output).open("w") as out:
        trio.run(Worker(spec, out).run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
