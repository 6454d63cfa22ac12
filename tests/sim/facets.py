"""The simulation's facet: every write also appends to an append-only log in the facet.

The log is the reference model's input: the checker replays it to get the state the facet
must hold, and finds each operation's place in it by its *tag* (``client:seq``, the same for
every attempt of one operation). So an operation applied twice shows as a repeated tag, a lost
one as a missing tag, and the facet's order as the log's order. Each write's result names its
log index, so the checker also knows that a reply describes the application it claims to.

Layout: ``next`` (log length), ``log/<index:08d>`` -> ``[tag, kind, a, b, origin]`` (origin:
the id of the facet that wrote the entry; a clone, an import or a restore carries entries of
another facet, or of an earlier state, over to a facet's log), ``count`` (sum of
every ``add``), ``reg/<key>`` (register values), ``pad/<key>`` (a string of ``pad_bytes(value)``
bytes written with each register value, up to 21 KB: maps start at 64 KiB, so they grow).

Timers. ``tset`` sets a timer (replacing one of that name) and logs
``[tag, "tset", name, [due_ms, at, fail_until, rearms]]``; ``tcancel`` cancels one and logs
``[tag, "tcancel", name, existed]``. The timer's payload names its *instance* (the ``tset``'s
tag; a timer that ``on_timer`` sets again is the instance plus ``+``), when it was asked to be
due, and how its deliveries behave. ``on_timer`` reports every attempt to the run's history
(in memory: failed attempts leave nothing on disk) and logs a successful one as
``[instance, "fire", name, [attempt, wall time, rearm]]`` in the same message as the timer's
removal; an attempt numbered ``fail_until`` or less writes that entry and then raises, so the
entry must vanish. So the log says which timer instance was delivered, when, and in which order
with the sets and cancels of its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import trio

from facetrt import Facet, rpc

if TYPE_CHECKING:
    from facetrt import Timer, Value

    from .history import History

CLASS_NAME = "Sim"
LOG_PREFIX = "log/"
REGISTER_PREFIX = "reg/"
PAD_PREFIX = "pad/"
WALL_CLOCK_BASE = 1_700_000_000.0
ROLLED_BACK = "rolled back"  # the instance of timers set in a rolled-back transaction() block


def wall_clock() -> float:
    """The runtime's wall clock in the simulation: it moves with trio's (mock) clock."""
    return WALL_CLOCK_BASE + trio.current_time()


def timer_payload(
    instance: str, at: float, fail_until: int, rearms: int, rearm_after: float, sleep: float
) -> dict[str, Value]:
    """What a timer carries: its instance, when it was asked to be due, how it behaves."""
    return {"i": instance, "at": at, "f": fail_until, "r": rearms, "ra": rearm_after, "s": sleep}


def pad_bytes(value: int) -> int:
    """The size of the padding written with register value ``value``."""
    return (value % 8) * 3000


class _RolledBack(Exception):
    pass


class TimerFailure(Exception):
    """What ``on_timer`` raises for the attempts its payload says must fail."""


class SimFacet(Facet):
    """Counter, registers and forwarding, each write logged (see the module docstring).

    ``sleep`` makes a handler slow (trio time): before its first write, or between its
    writes so that a handler cancelled halfway shows whether half a message can survive.
    """

    # Turns that began while another turn of the same activation was running: the input gate
    # broken. A list the harness empties before each run (one run at a time per process).
    overlapping_turns: ClassVar[list[str]] = []
    # The run's history, which records every on_timer attempt (set by the harness per run).
    history: ClassVar[History | None] = None

    def __init__(self) -> None:
        self._turn: str | None = None

    def _enter(self, tag: str) -> None:
        if self._turn is not None:
            SimFacet.overlapping_turns.append(f"{self.agent_id}: {tag} began inside {self._turn}")
        self._turn = tag

    def _append(self, tag: str, kind: str, first: Value, second: Value) -> int:
        index = self.storage.get("next", 0)
        assert isinstance(index, int)
        entry: list[Value] = [tag, kind, first, second, self.agent_id]
        self.storage.put(f"{LOG_PREFIX}{index:08d}", entry)
        self.storage.put("next", index + 1)
        return index

    def _add(self, tag: str, by: int) -> list[Value]:
        index = self._append(tag, "add", by, None)
        count = self.storage.get("count", 0)
        assert isinstance(count, int)
        self.storage.put("count", count + by)
        return [count + by, index]

    @rpc
    async def add(self, tag: str, by: int, sleep: float = 0.0, fail: bool = False) -> list[Value]:
        """Add ``by`` to the counter; return ``[count, log index]``. ``fail`` raises after
        writing (those writes must vanish)."""
        self._enter(tag)
        try:
            if sleep:
                await trio.sleep(sleep / 2)
            result = self._add(tag, by)
            if sleep:
                await trio.sleep(sleep / 2)
            if fail:
                raise ValueError("failing on purpose after writing")
            return result
        finally:
            self._turn = None

    def _rolled_back_block(self, key: str) -> None:
        """Writes in a ``transaction()`` block that raises: none may survive (the checker
        would see the register at -1 or the log length at -1)."""
        try:
            with self.storage.transaction():
                self.storage.put(f"{REGISTER_PREFIX}{key}", -1)
                self.storage.put("next", -1)
                raise _RolledBack
        except _RolledBack:
            pass

    @rpc
    async def put(self, tag: str, key: str, value: int, sleep: float = 0.0) -> int:
        """Set register ``key``; return the log index."""
        self._enter(tag)
        try:
            if sleep:
                await trio.sleep(sleep)
            if value % 3 == 0:
                self._rolled_back_block(key)
            index = self._append(tag, "put", key, value)
            self.storage.put(f"{REGISTER_PREFIX}{key}", value)
            pad = pad_bytes(value)
            if pad:
                self.storage.put(f"{PAD_PREFIX}{key}", "x" * pad)
            else:
                self.storage.delete(f"{PAD_PREFIX}{key}")
            return index
        finally:
            self._turn = None

    @rpc
    async def get(self, tag: str, key: str) -> list[Value]:
        """Register ``key`` and the log length it was read at: ``[value, length]``."""
        self._enter(tag)
        try:
            return [self.storage.get(f"{REGISTER_PREFIX}{key}"), self.storage.get("next", 0)]
        finally:
            self._turn = None

    @rpc
    async def forward(
        self, tag: str, target: str, by: int, key: str | None, sleep: float = 0.0
    ) -> list[Value]:
        """Log the forward here, then ``add`` on facet ``target`` (with ``key`` + ``/in`` as
        its idempotency key when given); return ``[log index, target's result]``."""
        self._enter(tag)
        try:
            index = self._append(tag, "forward", target, by)
            if sleep:
                await trio.sleep(sleep)
            inner_key = None if key is None else f"{key}/in"
            inner = await self.facets.call(
                target, "add", tag, by, cls=CLASS_NAME, idempotency_key=inner_key
            )
            return [index, inner]
        finally:
            self._turn = None

    # -- timers -----------------------------------------------------------------------------

    def _rolled_back_timers(self, name: str) -> None:
        """Timer changes in a ``transaction()`` block that raises: none may survive (a timer
        named ``rb-...`` would fire, or ``name`` would go missing without its cancel logged)."""
        try:
            with self.storage.transaction():
                payload = timer_payload(ROLLED_BACK, wall_clock(), 0, 0, 0.0, 0.0)
                self.timers.set(f"rb-{name}", payload=payload)
                self.timers.cancel(name)
                raise _RolledBack
        except _RolledBack:
            pass

    @rpc
    async def tset(
        self,
        tag: str,
        name: str,
        after: float,
        *,
        absolute: bool = False,
        fail_until: int = 0,
        rearms: int = 0,
        rearm_after: float = 0.0,
        timer_sleep: float = 0.0,
        sleep: float = 0.0,
        fail: bool = False,
        rollback: bool = False,
    ) -> list[Value]:
        """Set timer ``name`` due ``after`` seconds from now (given as ``at`` if ``absolute``,
        then possibly in the past), log it and return ``[log index, due ms]``. ``fail`` raises
        after that (nothing may survive, the timer included)."""
        self._enter(tag)
        try:
            if sleep:
                await trio.sleep(sleep)
            if rollback:
                self._rolled_back_timers(name)
            at = wall_clock() + after
            payload = timer_payload(tag, at, fail_until, rearms, rearm_after, timer_sleep)
            if absolute:
                self.timers.set(name, at=at, payload=payload)
            else:
                self.timers.set(name, after_seconds=after, payload=payload)
            due_ms = self._due_ms(name, tag)
            index = self._append(tag, "tset", name, [due_ms, at, fail_until, rearms])
            if fail:
                raise ValueError("failing on purpose after setting a timer")
            return [index, due_ms]
        finally:
            self._turn = None

    def _due_ms(self, name: str, instance: str) -> int:
        """The due time of timer ``name`` as this message sees it (its own set included)."""
        timer = self.timers.get(name)
        assert timer is not None, f"timer {name} just set is not visible"
        assert _instance(timer) == instance, f"timer {name} is {timer}, not {instance}"
        return round(timer.at * 1000)

    @rpc
    async def tcancel(self, tag: str, name: str, sleep: float = 0.0) -> list[Value]:
        """Cancel timer ``name``; log and return ``[log index, whether it existed]``."""
        self._enter(tag)
        try:
            if sleep:
                await trio.sleep(sleep)
            existed = self.timers.cancel(name)
            return [self._append(tag, "tcancel", name, existed), existed]
        finally:
            self._turn = None

    @rpc
    async def tlist(self, tag: str) -> list[Value]:
        """Every timer and the log length it was read at: ``[timers, length]``."""
        self._enter(tag)
        try:
            return [self._timer_rows(), self.storage.get("next", 0)]
        finally:
            self._turn = None

    def _timer_rows(self) -> list[Value]:
        """``[name, instance, due ms, attempts, failed, error]`` of every timer."""
        return [
            [
                timer.name,
                _instance(timer),
                round(timer.at * 1000),
                timer.attempts,
                timer.failed,
                timer.error,
            ]
            for timer in self.timers.list()
        ]

    async def on_timer(self, name: str, payload: Value, attempt: int) -> None:
        """Report the attempt, then log the delivery (and set the timer again if its payload
        says so), or fail the attempts the payload says must fail, after writing."""
        self._enter(f"on_timer {name}")
        try:
            now = wall_clock()
            if SimFacet.history is not None:
                SimFacet.history.timer_attempt(self.agent_id, name, payload, attempt, now)
            assert isinstance(payload, dict)
            instance, fail_until, rearms = payload["i"], payload["f"], payload["r"]
            sleep, rearm_after = payload["s"], payload["ra"]
            assert isinstance(instance, str)
            assert isinstance(fail_until, int)
            assert isinstance(rearms, int)
            assert isinstance(sleep, float)
            assert isinstance(rearm_after, float)
            if sleep:
                await trio.sleep(sleep)
            rearm: Value = None
            if rearms and attempt > fail_until:
                again = f"{instance}+"
                at = wall_clock() + rearm_after
                self.timers.set(
                    name,
                    after_seconds=rearm_after,
                    payload=timer_payload(again, at, 0, rearms - 1, rearm_after, sleep),
                )
                rearm = [again, self._due_ms(name, again), at]
            self._append(instance, "fire", name, [attempt, now, rearm])
            if attempt <= fail_until:
                raise TimerFailure(f"failing attempt {attempt} on purpose")
        finally:
            self._turn = None

    @rpc
    async def snapshot(self) -> dict[str, Value]:
        """The whole state, for the final check."""
        log = self.storage.list(prefix=LOG_PREFIX)
        registers = self.storage.list(prefix=REGISTER_PREFIX)
        pads = self.storage.list(prefix=PAD_PREFIX)
        keys: list[Value] = []
        keys.extend(sorted(log))
        return {
            "next": self.storage.get("next", 0),
            "count": self.storage.get("count", 0),
            "log": [log[name] for name in sorted(log)],
            "log_keys": keys,
            "registers": {name.removeprefix(REGISTER_PREFIX): v for name, v in registers.items()},
            "pads": {
                name.removeprefix(PAD_PREFIX): len(pad) if isinstance(pad, str) else -1
                for name, pad in pads.items()
            },
            "timers": self._timer_rows(),
        }


def _instance(timer: Timer) -> str:
    payload = timer.payload
    assert isinstance(payload, dict)
    instance = payload["i"]
    assert isinstance(instance, str)
    return instance


CLASSES: dict[str, type[Facet]] = {CLASS_NAME: SimFacet}
