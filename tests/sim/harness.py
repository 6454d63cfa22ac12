"""One seeded run: the runtime and its protocol server under load and faults, then the check.

One integer seed fixes everything that varies (replay: ``python -m tests.sim --seed N``):

- the **plan** (``plan.py``): limits, fault rates and every operation of every client;
- the **faults** as they happen: one random stream drawn in the order the store jobs run and
  the connections drop, which is fixed by
- **trio's schedule**: trio runs each batch of ready tasks in a random order from a
  module-level ``random.Random`` (``trio._core._run._r``). Here it is seeded from the run's
  seed and ``_ALLOW_DETERMINISTIC_SCHEDULING`` is switched on, so that a batch is first sorted
  by task creation order and then shuffled: the order depends on the seed only, not on memory
  addresses (deadline ties and cancellation fan-out otherwise come in ``id()`` order). These
  are trio privates, touched for the length of one run and restored after it: acceptable in
  a test harness, which is the use trio keeps them for (its Hypothesis plugin does the same);
  a trio upgrade that renames them fails the determinism test loudly rather than silently;
- **time**: trio's ``MockClock`` with autojump, so sleeps, idle timeouts, deadlines and slow
  disks take no real time, and the wall clock of idempotency records follows it;
- **storage work** runs on the loop thread (``workers.py``): the runtime's writer threads are
  the one part that no seed can replay.

What stays outside the seed's reach: ``id()`` values, garbage collection, and the real time
each step takes, none of which the runtime's behaviour depends on. The determinism test runs
a seed twice and compares the digest of the whole trace (every call, outcome, fault and final
state, with its trio time).

A run goes through *epochs*, one per runtime lifetime: a crash cancels the runtime and every
caller at once (their calls become of unknown outcome) and a graceful restart stops the
callers, drains the protocol sessions and closes the runtime, as the daemon does. The next
epoch reopens the same data directory and the callers carry on. Once every call is done the
last epoch lingers (the plan says how long: timers keep firing under the faults meanwhile).
After each epoch, with no runtime open, the timer index is checked against the facets' stores
on disk (decision 0007's invariant: a hint at or before every scheduled timer). Finally a
fault-free runtime lets every timer come due and fire, touching no facet until the latest
time any of them could still be due, then reads every facet back, and ``checker.check`` holds
it against the history.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, final

import trio
import trio._core._run as trio_run
import trio.testing
from prometheus_client import CollectorRegistry

from facetrt import FacetAddress, FacetrtError, NotFoundError, RuntimeConfig, UnavailableError
from facetrt.client._link import handshake
from facetrt.data import DataOperations
from facetrt.data._backup import entry_path
from facetrt.data._environment import scan_timers
from facetrt.data._files import SCRATCH_DIR
from facetrt.data._jsonl import export_lines
from facetrt.metrics import FacetrtMetrics
from facetrt.runtime._runtime import TIMER_INDEX_DIR, open_runtime_using
from facetrt.server._auth import AuthThrottle
from facetrt.server._tcp import TcpServer
from facetrt.storage import SystemStore, TimerIndex
from facetrt.storage._store import store_exists

from .checker import CheckResult, FacetState, check
from .facets import CLASS_NAME, CLASSES, LOG_PREFIX, SimFacet, wall_clock
from .faults import StoreFaults
from .history import History, Status
from .plan import MAP_SIZE_BYTES_INITIAL, TENANT, make_plan
from .timer_checks import TimerRules
from .transport import MemoryListener
from .workers import LoopStoreWorkers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable, Iterator

    from facetrt import Runtime, Value
    from facetrt.client._link import Link

    from .history import Attempt, DataOp
    from .plan import ClientSpec, DataOpSpec, OperationSpec, SimPlan
    from .transport import ClientStream

MEMORY_DIR = "/dev/shm"
RUN_SECONDS_MAX = 100_000.0  # trio time: a run still going by then is stuck (a deadlock)
EPOCHS_MAX = 64
CONNECT_SECONDS = 10.0
REPLAY = ".venv/bin/python -m tests.sim --seed {seed}"
STATISTICS = (
    "activations",
    "passivations",
    "resets",
    "commits",
    "commits_inline",
    "commit_failures",
    "map_grows",
    "overloaded",
    "timer_wakes",
    "timers_fired",
    "timer_handler_failures",
    "timers_failed",
)
# The final runtime waits, per delivery a timer may still need, this much beyond its due time
# and backoff before it reads the facets: a fault-free runtime fires a due timer within a few
# milliseconds, a wake that fails is retried after 10 s, one that finds nothing after 1 s.
DELIVERY_SLACK_SECONDS = 15.0
DRAIN_MARGIN_SECONDS = 60.0


def _memory_dir() -> str | None:
    """A tmpfs to run in when there is one: fsync costs nothing there (a loaded disk makes it
    milliseconds), and the simulation checks the runtime's logic, not the disk's; the crash
    loop and the storage-fault tests check the disk."""
    if os.path.isdir(MEMORY_DIR) and os.access(MEMORY_DIR, os.W_OK):
        return MEMORY_DIR
    return None


@contextlib.contextmanager
def seeded_scheduling(seed: int) -> Iterator[None]:
    """Make trio's batch order a function of ``seed`` for the enclosed ``trio.run``."""
    saved_flag = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    saved_state = trio_run._r.getstate()
    setattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)  # noqa: B010 - a Final private
    trio_run._r.seed(f"schedule/{seed}")
    try:
        yield
    finally:
        setattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", saved_flag)  # noqa: B010
        trio_run._r.setstate(saved_state)


@dataclass(slots=True, kw_only=True)
class SimResult:
    seed: int
    plan: SimPlan
    history: History
    check: CheckResult
    states: dict[str, FacetState]
    digest: str
    epochs: int
    statistics: Counter[str]
    rules: TimerRules

    @property
    def ok(self) -> bool:
        return self.check.ok

    @property
    def replay(self) -> str:
        return REPLAY.format(seed=self.seed)

    def attempts(self) -> int:
        return sum(len(operation.attempts) for operation in self.history.operations.values())

    def timer_deliveries(self) -> int:
        """Timer instances delivered (the ``fire`` entries in the facets' logs)."""
        return sum(entry.kind == "fire" for state in self.states.values() for entry in state.log)

    def report(self) -> str:
        """What a failure prints: the seed, the command that replays it, what broke."""
        lines = [
            f"simulation seed {self.seed}: "
            f"{'passed' if self.ok else f'{len(self.check.violations)} violation(s)'}",
            f"replay: {self.replay}",
            f"plan: {self.plan.describe()}",
            f"ran: {len(self.history.operations)} operations, {self.attempts()} attempts, "
            f"{self.epochs} runtime lifetimes, {len(self.history.timer_attempts)} on_timer "
            f"attempts, {self.timer_deliveries()} timers delivered, "
            f"faults {dict(sorted(self.history.faults.items()))}",
            f"runtime: {dict(self.statistics)}",
            f"trace digest: {self.digest}",
        ]
        lines += [f"  {violation}" for violation in self.check.violations[:40]]
        if len(self.check.violations) > 40:
            lines.append(f"  ... and {len(self.check.violations) - 40} more")
        return "\n".join(lines)


def run_simulation(
    seed: int,
    *,
    directory: Path | None = None,
    lose_failed_commits: bool = False,
    schedule_seed: int | None = None,
) -> SimResult:
    """Run seed ``seed`` to the end and check it (in its own ``trio.run``: call it from sync
    code). ``lose_failed_commits`` breaks the runtime on purpose (see ``StoreFaults``);
    ``schedule_seed`` seeds trio's scheduling apart from the rest (tests)."""
    plan = make_plan(seed)
    with contextlib.ExitStack() as stack:
        if directory is None:
            scratch = tempfile.TemporaryDirectory(prefix="facetrt-sim-", dir=_memory_dir())
            directory = Path(stack.enter_context(scratch))
        simulation = _Simulation(plan, directory, lose_failed_commits=lose_failed_commits)
        stack.enter_context(seeded_scheduling(seed if schedule_seed is None else schedule_seed))
        try:
            trio.run(simulation.run, clock=trio.testing.MockClock(autojump_threshold=0))
        except BaseException as exc:  # an invariant broke inside facetrt, or the harness
            exc.add_note(f"simulation seed {seed}; replay: {REPLAY.format(seed=seed)}")
            raise
    return simulation.result()


def hint_violations(
    data_dir: Path, facets: Iterable[str], *, map_size_bytes: int = 1 << 30
) -> list[str]:
    """Decision 0007's invariant on disk, with no runtime open: for every facet whose store
    holds a scheduled timer due at ``d``, the timer index holds a hint ``h <= d``. A crash
    anywhere, a failed write, a graceful close: it must hold whatever ended a runtime's life.
    (Only between lifetimes: an activation registers its store's timers again, so a missing
    hint would be repaired by the next call to the facet, and go unnoticed.)"""
    problems = []
    index = TimerIndex(data_dir / TIMER_INDEX_DIR, map_size_bytes=map_size_bytes, readers_max=1)
    try:
        for facet in facets:
            address = FacetAddress(TENANT, facet)
            path = data_dir.resolve() / address.relative_path()
            if not store_exists(path):
                continue
            earliest = scan_timers(path).earliest_ms
            hint = index.hint_of(address)
            if earliest is not None and (hint is None or hint > earliest):
                problems.append(
                    f"{facet}: its earliest timer is due at {earliest} ms but the timer index "
                    f"holds {hint}: it would not fire until something else woke the facet"
                )
    finally:
        index.close()
    return problems


@dataclass(slots=True)
class _Lane:
    specs: tuple[OperationSpec, ...]
    position: int = 0

    def is_done(self) -> bool:
        return self.position >= len(self.specs)


@dataclass(slots=True)
class _Client:
    spec: ClientSpec
    lanes: list[_Lane]
    link: Link | None = None
    stream: ClientStream | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(slots=True)
class _Epoch:
    """One runtime lifetime."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    restart_at: float | None = None
    stopping: bool = False  # a graceful restart: lanes stop before their next operation
    stop_event: trio.Event = field(default_factory=trio.Event)  # set with ``stopping``
    listener: MemoryListener = field(default_factory=MemoryListener)
    nursery: trio.Nursery | None = None

    def is_stopping(self) -> bool:
        return self.stopping


@final
class _Simulation:
    def __init__(self, plan: SimPlan, root: Path, *, lose_failed_commits: bool) -> None:
        self.plan = plan
        self.data_dir = root / "data"
        self.system_dir = root / "system"
        self.lose_failed_commits = lose_failed_commits
        self.history = History()
        self.fault_rng = random.Random(f"faults/{plan.seed}")
        self.clients = [
            _Client(client, [_Lane(lane) for lane in client.lanes]) for client in plan.clients
        ]
        self.restarts = list(plan.faults.restarts)
        self.crashes = 0
        self.epochs = 0
        self.states: dict[str, FacetState] = {}
        self.stuck = False
        self.statistics: Counter[str] = Counter()
        self.key = ""
        self.hint_violations: list[str] = []
        self.data_position = 0  # the data lane's next operation (each runs at most once)
        self.backups: dict[str, tuple[DataOp, Path]] = {}
        config = plan.runtime
        self.rules = TimerRules(
            retries_max=config.timer_retries_max,
            retry_seconds_initial=config.timer_retry_seconds_initial,
            attempts=self.history.timer_attempts,
        )

    def result(self) -> SimResult:
        result = check(
            self.history.operations,
            self.states,
            SimFacet.overlapping_turns,
            rules=self.rules,
            data_ops=self.history.data_ops,
        )
        result.violations[:0] = self.hint_violations
        if self.stuck:
            result.violations.insert(
                0, f"stuck: the run had not finished by trio time {RUN_SECONDS_MAX} (a deadlock)"
            )
        return SimResult(
            seed=self.plan.seed,
            plan=self.plan,
            history=self.history,
            check=result,
            states=self.states,
            digest=self.history.digest(),
            epochs=self.epochs,
            statistics=self.statistics,
            rules=self.rules,
        )

    async def run(self) -> None:
        SimFacet.overlapping_turns.clear()
        SimFacet.history = self.history
        system = SystemStore(self.system_dir)
        try:
            system.create_tenant(TENANT)
            _, self.key = system.create_key(TENANT)
            # The store runners live outside the watchdog: a stuck run's runtime must still
            # be able to close its stores when the watchdog cancels it.
            async with trio.open_nursery() as outer:
                with trio.move_on_after(RUN_SECONDS_MAX) as watchdog:
                    while any(not lane.is_done() for c in self.clients for lane in c.lanes):
                        assert self.epochs < EPOCHS_MAX, "too many runtime lifetimes"
                        await self._epoch(outer, system)
                self.stuck = watchdog.cancelled_caught
                self.states = await self._read_back(outer)
        finally:
            system.close()
            SimFacet.history = None

    # -- runtime lifetimes ---------------------------------------------------------------

    async def _epoch(self, outer: trio.Nursery, system: SystemStore) -> None:
        self.epochs += 1
        epoch = _Epoch(restart_at=self.restarts.pop(0) if self.restarts else None)
        self.history.note("epoch", self.epochs)
        faults = StoreFaults(
            self.fault_rng,
            self.plan.faults,
            self.history,
            crash_allowed=self.crashes < self.plan.faults.crashes_max,
            on_crash=partial(self._crash, epoch),
            lose_failed_commits=self.lose_failed_commits,
        )
        workers = LoopStoreWorkers(
            outer, runners=self.plan.store_runners, delay=faults.delay, after_job=faults.after_job
        )
        with epoch.scope:
            async with open_runtime_using(
                workers,
                self.data_dir,
                classes=CLASSES,
                config=self.plan.runtime,
                store_hooks=faults.hooks(),
                wall_clock=wall_clock,
            ) as runtime:
                try:
                    await self._serve(runtime, system, epoch)
                finally:
                    self._count(runtime)
        self.crashes += faults.crashed
        if not faults.crashed:
            # Every data operation ended (lanes finish before a graceful close), failed ones
            # included: none may leave its scratch directory behind.
            self._check_scratch(f"after runtime lifetime {self.epochs} closed")
        self._check_hints()

    def _crash(self, epoch: _Epoch, kind: str) -> None:
        """In or right after a store job, before the runtime hears of it: the node is gone."""
        self.history.crash(kind)
        epoch.scope.cancel()

    def _check_hints(self) -> None:
        """Decision 0007's invariant on disk after a runtime lifetime (see hint_violations)."""
        self.hint_violations += [
            f"after runtime lifetime {self.epochs}: {problem}"
            for problem in hint_violations(
                self.data_dir,
                self.plan.facets,
                map_size_bytes=self.plan.runtime.timer_index_map_size_bytes,
            )
        ]

    def _check_scratch(self, when: str) -> None:
        scratch = self.data_dir / SCRATCH_DIR
        left = sorted(entry.name for entry in scratch.iterdir()) if scratch.is_dir() else []
        if left:
            self.hint_violations.append(f"{when}: scratch/ still holds {left}")

    def _count(self, runtime: Runtime) -> None:
        statistics = runtime.statistics()
        for name in STATISTICS:
            self.statistics[name] += getattr(statistics, name)

    async def _serve(self, runtime: Runtime, system: SystemStore, epoch: _Epoch) -> None:
        tcp = TcpServer(
            runtime=runtime,
            system=system,
            config=self.plan.server,
            metrics=FacetrtMetrics(CollectorRegistry()),
            throttle=AuthThrottle(failures_free=5, delay_seconds_max=1.0),
        )
        operations = DataOperations(runtime, system=None)
        if self.plan.data_ops:  # (without, a seed runs exactly as it did before they came)
            await operations.start()
            self._check_scratch("after DataOperations.start()")
        async with trio.open_nursery() as nursery:
            epoch.nursery = nursery
            await nursery.start(tcp.serve, [epoch.listener], nursery)
            if epoch.restart_at is not None:
                nursery.start_soon(self._restart_later, epoch)
            for client in self.clients:
                client.link, client.stream, client.lock = None, None, trio.Lock()
                if client.spec.protocol and self.plan.faults.drop_seconds is not None:
                    nursery.start_soon(
                        self._drop_connections, client, self.plan.faults.drop_seconds
                    )
            async with trio.open_nursery() as lanes:
                for client in self.clients:
                    for lane in client.lanes:
                        if not lane.is_done():
                            lanes.start_soon(self._lane, client, lane, runtime, epoch)
                if self.data_position < len(self.plan.data_ops):
                    lanes.start_soon(self._data_lane, operations, epoch)
            if not epoch.stopping:
                # Every call is done: the runtime keeps going (timers fire, under the faults)
                # for the plan's linger time, or until a restart comes.
                with trio.move_on_after(self.plan.linger_seconds):
                    await epoch.stop_event.wait()
            # Every lane finished or stopped for a restart: drain as the daemon does.
            with trio.move_on_after(self.plan.runtime.shutdown_grace_seconds + 1.0):
                await tcp.drain()
            nursery.cancel_scope.cancel()

    async def _restart_later(self, epoch: _Epoch) -> None:
        assert epoch.restart_at is not None
        await trio.sleep_until(epoch.restart_at)
        self.history.fault("graceful_restart")
        epoch.stopping = True
        epoch.stop_event.set()

    async def _drop_connections(self, client: _Client, mean_seconds: float) -> None:
        while True:
            await trio.sleep(self.fault_rng.expovariate(1 / mean_seconds))
            link, stream = client.link, client.stream
            if link is not None and stream is not None and link.waiters:
                self.history.fault("connection_dropped", len(link.waiters))
                stream.drop()

    def _drain_seconds(self) -> float:
        """How long after it opens the final runtime may still have a timer to deliver: the
        latest a timer set before could be due, with every retry's backoff and every set
        again by on_timer, each delivery given DELIVERY_SLACK_SECONDS."""
        config = self.plan.runtime
        backoff = config.timer_retry_seconds_initial * (2**config.timer_retries_max - 1)
        deliveries = (config.timer_retries_max + 1) * (DELIVERY_SLACK_SECONDS + backoff)
        latest = 0.0
        for client in self.plan.clients:
            for lane in client.lanes:
                for spec in lane:
                    if spec.kind == "tset":
                        chain = spec.rearms + 1
                        latest = max(
                            latest,
                            max(spec.after, 0.0)
                            + chain * (deliveries + spec.timer_sleep)
                            + spec.rearms * spec.rearm_after,
                        )
        return latest + DRAIN_MARGIN_SECONDS if latest else 0.0

    async def _read_back(self, outer: trio.Nursery) -> dict[str, FacetState]:
        """Every facet's state, read by a fresh fault-free runtime from the data on disk once
        every timer had its time to fire (no facet is touched before: an activation would
        register its timers with the index again, hiding a hint that went missing)."""
        self.history.note("read back", None)
        planned = self.plan.runtime
        config = RuntimeConfig(
            map_size_bytes_initial=MAP_SIZE_BYTES_INITIAL,
            open_facets_max=len(self.plan.facets),
            # The run's retry policy, which the checker holds every attempt to.
            timer_retries_max=planned.timer_retries_max,
            timer_retry_seconds_initial=planned.timer_retry_seconds_initial,
        )
        states = {}
        async with open_runtime_using(
            LoopStoreWorkers(outer, runners=1),
            self.data_dir,
            classes=CLASSES,
            config=config,
            store_hooks=None,
            wall_clock=wall_clock,
        ) as runtime:
            await trio.sleep(self._drain_seconds())
            for facet in self.plan.facets:
                try:
                    raw = await runtime.call(TENANT, facet, "snapshot")
                except NotFoundError:
                    states[facet] = FacetState()  # never created (or never committed)
                    continue
                assert isinstance(raw, dict)
                states[facet] = FacetState.from_snapshot(raw)
                self.history.note(
                    "state", [facet, raw["next"], raw["count"], raw["registers"], raw["timers"]]
                )
        return states

    # -- data operations -----------------------------------------------------------------

    async def _data_lane(self, operations: DataOperations, epoch: _Epoch) -> None:
        specs = self.plan.data_ops
        while self.data_position < len(specs) and not epoch.stopping:
            spec = specs[self.data_position]
            await trio.sleep(spec.think)
            if epoch.is_stopping():
                return
            self.data_position += 1
            if spec.kind == "restore" and (
                spec.backup not in self.backups
                or self.backups[spec.backup][0].status is not Status.OK
            ):
                self.history.note("restore skipped", [spec.tag, spec.backup])
                continue
            await self._data_op(operations, spec)

    async def _data_op(self, operations: DataOperations, spec: DataOpSpec) -> None:
        operation = self.history.data_started(spec)
        entries: list[list[Value]] | None = None
        try:
            if spec.kind == "delete":
                await operations.delete_facet(TENANT, spec.facet)
            elif spec.kind == "clone":
                await operations.clone(TENANT, spec.source, TENANT, spec.facet, force=spec.force)
            elif spec.kind == "transfer":
                async with operations.export(TENANT, spec.source) as chunks:
                    data = b"".join([chunk async for chunk in chunks])
                entries = operation.entries = _logged_entries(data.splitlines())
                operation.copied = self.history.data_copied(operation)
                await operations.import_facet(TENANT, spec.facet, _chunks(data), force=spec.force)
            elif spec.kind == "backup":
                target = self.data_dir.parent / "backups" / spec.tag
                self.backups[spec.tag] = (operation, target)
                await operations.backup(target, tenant=TENANT, agent=spec.facet)
                address = FacetAddress(TENANT, spec.facet)
                copy = (target / entry_path(address)).parent
                entries = _logged_entries(export_lines(copy, address))
            else:
                assert spec.kind == "restore"
                backup, source = self.backups[spec.backup]
                operation.copied_from = backup
                await operations.restore(source, tenant=TENANT, agent=spec.facet, force=True)
        except FacetrtError as exc:
            code = exc.code.value
            self.history.note("data failed", [spec.tag, code, str(exc)])
            # Refused before anything changed; any other error may come after the swap.
            definite = code in ("not_found", "conflict")
            self.history.data_ended(
                operation, Status.FAILED if definite else Status.UNKNOWN, code, entries
            )
            return
        except trio.Cancelled:
            self.history.data_ended(operation, Status.UNKNOWN, "cancelled", entries)
            raise
        self.history.data_ended(operation, Status.OK, None, entries)

    # -- callers -------------------------------------------------------------------------

    async def _lane(self, client: _Client, lane: _Lane, runtime: Runtime, epoch: _Epoch) -> None:
        while not lane.is_done() and not epoch.stopping:
            spec = lane.specs[lane.position]
            await trio.sleep(spec.think)
            if epoch.is_stopping():  # a restart began while this lane waited
                return
            lane.position += 1  # sent at most once by this lane, even if a crash interrupts it
            if client.spec.protocol:
                await self._call_protocol(client, spec, epoch)
            else:
                await self._call_embedded(runtime, spec)

    def _invoke(self, spec: OperationSpec, path: str) -> Attempt:
        if spec.sleep:
            self.history.fault("slow_handler")
        return self.history.invoke(spec, path)

    async def _call_embedded(self, runtime: Runtime, spec: OperationSpec) -> None:
        method, args, kwargs = spec.call()
        attempt = self._invoke(spec, "embedded")
        give_up = math.inf if spec.cancel_after is None else spec.cancel_after
        try:
            with trio.move_on_after(give_up) as scope:
                result = await runtime.call(
                    TENANT,
                    spec.facet,
                    method,
                    *args,
                    cls=CLASS_NAME,
                    idempotency_key=spec.idempotency_key,
                    **kwargs,
                )
        except FacetrtError as exc:
            self.history.failed(spec, attempt, exc.code.value)
            return
        if scope.cancelled_caught:
            self.history.fault("call_cancelled")
            self.history.unknown(spec, attempt, "cancelled")
        else:
            self.history.ok(spec, attempt, result)

    async def _call_protocol(self, client: _Client, spec: OperationSpec, epoch: _Epoch) -> None:
        method, args, kwargs = spec.call()
        link = await self._link(client, epoch)
        attempt = self._invoke(spec, "protocol")
        if link is None:
            self.history.failed(spec, attempt, "unavailable")  # could not connect: not sent
            return
        deadline_ms = None
        if spec.deadline_seconds is not None:
            deadline_ms = max(1, round(spec.deadline_seconds * 1000))
        try:
            result = await link.call(
                spec.facet, method, args, kwargs, CLASS_NAME, spec.idempotency_key, deadline_ms
            )
        except UnavailableError:
            if link.error is not None:  # the connection broke: the server may have run it
                self.history.unknown(spec, attempt, "connection lost")
            else:
                self.history.failed(spec, attempt, "unavailable")
        except FacetrtError as exc:
            self.history.failed(spec, attempt, exc.code.value)
        else:
            self.history.ok(spec, attempt, result)

    async def _link(self, client: _Client, epoch: _Epoch) -> Link | None:
        """The client's connection, made (with its handshake) when it has none usable."""
        async with client.lock:
            if client.link is not None and not client.link.is_closing():
                return client.link
            try:
                stream = await epoch.listener.connect()
                link = await handshake(stream, self.key, peer="sim", seconds=CONNECT_SECONDS)
            except (OSError, FacetrtError):
                return None
            assert epoch.nursery is not None
            epoch.nursery.start_soon(link.run)
            client.link, client.stream = link, stream
            return link


def _logged_entries(lines: Iterable[bytes]) -> list[list[Value]]:
    """The facet log held by an export (or a copy's export), in log order."""
    log = {}
    for line in lines:
        document = json.loads(line)
        key = document.get("key")
        if document.get("db") == "data" and isinstance(key, str) and key.startswith(LOG_PREFIX):
            log[key] = document["value"]
    return [log[key] for key in sorted(log)]


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await trio.lowlevel.checkpoint()
        yield data[start : start + size]
