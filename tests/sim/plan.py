"""What one seed decides before the run starts: limits, fault rates and the whole workload.

The workload is generated up front from its own random stream, so it is the same whatever
happens during the run; only outcomes depend on the schedule (which the seed also fixes, see
``harness``). Each kind of fault is switched off in a share of the seeds, so a failure's seed
also tells which faults it needs. So are timers: in a share of the seeds no operation touches
one (and every commit is a plain one); in the others timers are set, replaced and cancelled
through the facets' methods, with the retry policy and the scheduler's bounds drawn per seed.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from facetrt.config import RuntimeConfig, ServerConfig

if TYPE_CHECKING:
    from facetrt import Value

TENANT = "sim"
REGISTER_KEYS = ("a", "b", "c", "d")
KINDS = ("add", "put", "get", "forward", "fail", "tset", "tcancel", "tlist", "tfail")
RAISING_KINDS = frozenset({"fail", "tfail"})  # the handler raises after writing, on purpose
TIMER_NAMES = ("t0", "t1", "t2")  # few names per facet: sets often replace a timer
ALWAYS_FAILS = 1_000  # a timer's fail_until that outlasts any retry budget
MAP_SIZE_BYTES_INITIAL = 64 * 1024  # the smallest: logs of a few hundred entries grow maps


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultRates:
    """How often each fault happens in one run (0: never)."""

    storage_hooks: bool  # off: no storage faults, and idle commits may run inline (0009)
    commit_failure: float  # per commit: StorageError from the commit hook, nothing written
    crash: float  # per commit: the node dies after it committed, before any reply
    crash_before: float  # per commit and per timer index write: the node dies before it
    crashes_max: int
    index_failure: float  # per timer index write (a lower or a settle): StorageError
    restarts: tuple[float, ...]  # trio times of graceful restarts (drain and reopen)
    slow_store_job: float  # per store job (open, commit, close): it first waits
    slow_store_job_seconds: float  # mean wait
    slow_handler: float  # per operation: its handler sleeps
    slow_handler_seconds: float  # mean sleep
    cancel: float  # per embedded call: the caller gives up after a while
    deadline: float  # per protocol call: it carries a short deadline
    drop_seconds: float | None  # mean life of a protocol connection before it drops


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationSpec:
    """One operation as a lane will send it; a repeat has the tag of the one it repeats."""

    tag: str
    kind: str
    facet: str
    target: str | None = None  # forward's destination
    by: int = 0
    key: str = ""  # register key (put, get)
    value: int = 0
    idempotency_key: str | None = None
    sleep: float = 0.0  # the handler's
    think: float = 0.0  # the lane waits this long before sending
    cancel_after: float | None = None  # embedded: give up after this long
    deadline_seconds: float | None = None  # protocol: the call's deadline
    is_repeat: bool = False
    # Timers (tset, tfail, tcancel): the name; when it is due (``after`` seconds from the
    # set, given as ``at`` if ``absolute``: then possibly in the past); attempts of on_timer
    # that fail before one succeeds; how often on_timer sets it again, how far ahead; how
    # long on_timer sleeps.
    name: str = ""
    after: float = 0.0
    absolute: bool = False
    fail_until: int = 0
    rearms: int = 0
    rearm_after: float = 0.0
    timer_sleep: float = 0.0

    @property
    def raises(self) -> bool:
        """Its handler raises after writing: nothing of it may survive."""
        return self.kind in RAISING_KINDS

    def call(self) -> tuple[str, list[Value], dict[str, Value]]:
        """The method, positional and keyword arguments (identical for every attempt)."""
        if self.kind in ("tset", "tfail"):
            return (
                "tset",
                [self.tag, self.name, self.after],
                {
                    "absolute": self.absolute,
                    "fail_until": self.fail_until,
                    "rearms": self.rearms,
                    "rearm_after": self.rearm_after,
                    "timer_sleep": self.timer_sleep,
                    "sleep": self.sleep,
                    "fail": self.kind == "tfail",
                    "rollback": self.value % 4 == 0,
                },
            )
        if self.kind == "tcancel":
            return "tcancel", [self.tag, self.name], {"sleep": self.sleep}
        if self.kind == "tlist":
            return "tlist", [self.tag], {}
        if self.kind in ("add", "fail"):
            kwargs: dict[str, Value] = {"sleep": self.sleep, "fail": self.kind == "fail"}
            return "add", [self.tag, self.by], kwargs
        if self.kind == "put":
            return "put", [self.tag, self.key, self.value], {"sleep": self.sleep}
        if self.kind == "get":
            return "get", [self.tag, self.key], {}
        assert self.kind == "forward"
        args: list[Value] = [self.tag, self.target, self.by, self.idempotency_key]
        return "forward", args, {"sleep": self.sleep}


DATA_KINDS = ("delete", "clone", "transfer", "backup", "restore")


@dataclass(frozen=True, slots=True, kw_only=True)
class DataOpSpec:
    """One data operation (decision 0008) of the plan's data lane, run on the embedded
    runtime while the clients' calls go on. ``facet`` is the one whose state it replaces (or,
    for a backup, copies); ``source`` the facet a ``clone`` or a ``transfer`` (export, then
    import) copies from; ``backup`` the tag of the backup a ``restore`` installs (skipped
    unless that backup completed)."""

    tag: str
    kind: str
    facet: str
    source: str = ""
    backup: str = ""
    force: bool = True
    think: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSpec:
    name: str
    protocol: bool  # through the TCP session (in memory) rather than the embedded runtime
    lanes: tuple[tuple[OperationSpec, ...], ...]  # each lane: sequential; lanes concurrent


@dataclass(frozen=True, slots=True, kw_only=True)
class SimPlan:
    seed: int
    facets: tuple[str, ...]
    clients: tuple[ClientSpec, ...]
    runtime: RuntimeConfig
    server: ServerConfig
    store_runners: int
    faults: FaultRates
    timers: bool  # operations set, replace and cancel timers
    linger_seconds: float  # the runtime keeps running this long after the last call
    # Data operations, one after another, alongside the clients (none in a share of seeds),
    # on ``data_facets`` only: no timer is ever set on those (a timer model that follows
    # copies and deletes of timers is left out), every other operation reaches them.
    data_ops: tuple[DataOpSpec, ...] = ()
    data_facets: tuple[str, ...] = ()

    @property
    def operations(self) -> int:
        return sum(len(lane) for client in self.clients for lane in client.lanes)

    def describe(self) -> str:
        config = self.runtime
        lanes = sum(len(client.lanes) for client in self.clients)
        protocol = sum(client.protocol for client in self.clients)
        return (
            f"{len(self.facets)} facets, {len(self.clients)} clients ({protocol} over the "
            f"protocol), {lanes} lanes, {self.operations} operations; open_facets_max "
            f"{config.open_facets_max}, idle {config.idle_timeout_seconds:.2f} s, mailbox "
            f"{config.mailbox_envelopes_max}, inline commits {config.commit_inline_when_idle}; "
            f"timers {self.timers} (retries {config.timer_retries_max} from "
            f"{config.timer_retry_seconds_initial} s, {config.timer_fires_per_wake_max} per "
            f"wake, {config.timer_wakes_in_flight_max} wakes), linger {self.linger_seconds} s; "
            f"{len(self.data_ops)} data operations on {list(self.data_facets)}; {self.faults}"
        )


def _maybe(rng: random.Random, chance: float, low: float, high: float) -> float:
    """0 with probability 1 - ``chance``, else uniform in [low, high]."""
    return rng.uniform(low, high) if rng.random() < chance else 0.0


def make_plan(seed: int) -> SimPlan:
    rng = random.Random(f"plan/{seed}")
    facets = tuple(f"f{index}" for index in range(rng.randint(2, 7)))
    faults = _fault_rates(rng)
    timers = rng.random() < 0.75
    runtime = RuntimeConfig(
        mailbox_envelopes_max=rng.choice((2, 4, 8, 64, 1024)),
        mailbox_age_seconds_max=rng.choice((0.5, 2.0, 30.0)),
        batch_envelopes_max=rng.choice((1, 3, 1024)),
        open_facets_max=rng.randint(1, len(facets) + 1),
        activation_wait_seconds_max=rng.choice((0.2, 1.0, 5.0)),
        idle_timeout_seconds=rng.choice((0.01, 0.1, 0.5, 5.0, 60.0)),
        map_size_bytes_initial=MAP_SIZE_BYTES_INITIAL,
        commit_inline_when_idle=rng.random() < 0.7,
        deactivate_seconds_max=0.5,
        shutdown_grace_seconds=rng.choice((0.0, 0.5, 3.0)),
        timer_retries_max=rng.choice((0, 1, 2, 3, 6)),
        timer_retry_seconds_initial=rng.choice((0.01, 0.1, 0.5, 2.0)),
        timer_fires_per_wake_max=rng.choice((1, 2, 1024)),
        timer_wakes_in_flight_max=rng.choice((1, 2, 1024)),
    )
    server = ServerConfig(calls_in_flight_max=rng.choice((1, 2, 4, 64)))
    # Data operations draw from a stream of their own, so the rest of a plan stays as it was.
    data_rng = random.Random(f"data/{seed}")
    data_facets: tuple[str, ...] = ()
    if data_rng.random() < 0.6:
        # With timers, some facets are kept free of them for the data operations.
        data_facets = facets[-data_rng.randint(1, len(facets) - 1) :] if timers else facets
    timer_facets = tuple(facet for facet in facets if facet not in data_facets)
    client_count = rng.randint(2, 5)
    clients = tuple(
        _client(
            rng,
            f"c{index}",
            facets,
            faults,
            timers=timers,
            protocol=rng.random() < 0.5,
            timer_facets=timer_facets,
        )
        for index in range(client_count)
    )
    data_ops = _data_ops(data_rng, data_facets) if data_facets else ()
    return SimPlan(
        seed=seed,
        facets=facets,
        clients=clients,
        runtime=runtime,
        server=server,
        store_runners=rng.randint(1, 4),
        faults=faults,
        timers=timers,
        linger_seconds=rng.choice((0.0, 2.0, 10.0, 40.0)) if timers else 0.0,
        data_ops=data_ops,
        data_facets=data_facets,
    )


def _data_ops(rng: random.Random, facets: tuple[str, ...]) -> tuple[DataOpSpec, ...]:
    """A sequence of data operations on ``facets``, spread over the calls' time."""
    think_mean = rng.choice((0.05, 0.3, 1.0))
    backups: list[DataOpSpec] = []
    ops = []
    for number in range(rng.randint(2, 10)):
        weights = (3, 3 if len(facets) > 1 else 0, 2 if len(facets) > 1 else 0, 3, 3)
        kind = rng.choices(DATA_KINDS, weights)[0]
        if kind == "restore" and not backups:
            kind = "backup"
        facet = rng.choice(facets)
        spec = DataOpSpec(
            tag=f"d:{number}", kind=kind, facet=facet, think=rng.expovariate(1 / think_mean)
        )
        if kind in ("clone", "transfer"):
            source = rng.choice([other for other in facets if other != facet])
            spec = dataclasses.replace(spec, source=source, force=rng.random() < 0.8)
        elif kind == "restore":
            backup = rng.choice(backups)
            spec = dataclasses.replace(spec, facet=backup.facet, backup=backup.tag)
        elif kind == "backup":
            backups.append(spec)
        ops.append(spec)
    return tuple(ops)


def _fault_rates(rng: random.Random) -> FaultRates:
    hooks = rng.random() < 0.75
    restarts = sorted(rng.uniform(0.5, 20.0) for _ in range(rng.choice((0, 0, 1, 2))))
    return FaultRates(
        storage_hooks=hooks,
        commit_failure=_maybe(rng, 0.6, 0.01, 0.15) if hooks else 0.0,
        crash=_maybe(rng, 0.6, 0.005, 0.05) if hooks else 0.0,
        crash_before=_maybe(rng, 0.4, 0.002, 0.02) if hooks else 0.0,
        crashes_max=rng.choice((1, 2, 3)),
        index_failure=_maybe(rng, 0.5, 0.01, 0.15) if hooks else 0.0,
        restarts=tuple(round(time, 3) for time in restarts),
        slow_store_job=_maybe(rng, 0.6, 0.05, 0.5),
        slow_store_job_seconds=rng.choice((0.01, 0.1, 1.0)),
        slow_handler=_maybe(rng, 0.6, 0.05, 0.4),
        slow_handler_seconds=rng.choice((0.01, 0.2, 2.0)),
        cancel=_maybe(rng, 0.5, 0.05, 0.3),
        deadline=_maybe(rng, 0.5, 0.05, 0.3),
        drop_seconds=rng.choice((None, 0.5, 2.0, 8.0)),
    )


def _client(
    rng: random.Random,
    name: str,
    facets: tuple[str, ...],
    faults: FaultRates,
    *,
    timers: bool,
    protocol: bool,
    timer_facets: tuple[str, ...],
) -> ClientSpec:
    counter = iter(range(1_000_000))
    think_mean = rng.choice((0.01, 0.1, 0.5))
    keyed = rng.choice((0.0, 0.5, 1.0))
    repeated: list[OperationSpec] = []  # earlier keyed operations of this client
    lanes = []
    for _ in range(rng.randint(1, 3)):
        lane = []
        for _ in range(rng.randint(4, 20)):
            if repeated and rng.random() < 0.12:
                spec = _repeat(rng, rng.choice(repeated), faults, think_mean, protocol)
            else:
                tag = f"{name}:{next(counter)}"
                spec = _new(
                    rng,
                    tag,
                    facets,
                    faults,
                    think_mean,
                    protocol,
                    timers=timers,
                    timer_facets=timer_facets,
                )
                if rng.random() < keyed:
                    spec = _with_key(spec)
                    repeated.append(spec)
            lane.append(spec)
        lanes.append(tuple(lane))
    return ClientSpec(name=name, protocol=protocol, lanes=tuple(lanes))


def _with_key(spec: OperationSpec) -> OperationSpec:
    return dataclasses.replace(spec, idempotency_key=f"key/{spec.tag}")


@dataclass(frozen=True, slots=True)
class _Timing:
    think: float
    cancel_after: float | None
    deadline_seconds: float | None


def _timing(rng: random.Random, faults: FaultRates, think_mean: float, protocol: bool) -> _Timing:
    """When a lane sends an attempt, and when its caller gives up on it."""
    cancel = None
    deadline = None
    if not protocol and rng.random() < faults.cancel:
        cancel = rng.expovariate(1 / 0.2)
    if protocol and rng.random() < faults.deadline:
        deadline = max(0.001, rng.expovariate(1 / 0.2))
    return _Timing(rng.expovariate(1 / think_mean), cancel, deadline)


def _repeat(
    rng: random.Random,
    original: OperationSpec,
    faults: FaultRates,
    think_mean: float,
    protocol: bool,
) -> OperationSpec:
    timing = _timing(rng, faults, think_mean, protocol)
    return dataclasses.replace(
        original,
        is_repeat=True,
        think=timing.think,
        cancel_after=timing.cancel_after,
        deadline_seconds=timing.deadline_seconds,
    )


def _new(
    rng: random.Random,
    tag: str,
    facets: tuple[str, ...],
    faults: FaultRates,
    think_mean: float,
    protocol: bool,
    *,
    timers: bool,
    timer_facets: tuple[str, ...],
) -> OperationSpec:
    timer_weights = (20, 6, 4, 2) if timers else (0, 0, 0, 0)
    weights = (30, 25, 20, 12 if len(facets) > 1 else 0, 5, *timer_weights)
    kind = rng.choices(KINDS, weights)[0]
    facet = rng.choice(facets)
    # Any other facet: forwards from different callers may form cycles of facets waiting on
    # each other, which the runtime must refuse (reentrancy) rather than wait on for ever.
    target = (
        rng.choice([other for other in facets if other != facet]) if kind == "forward" else None
    )
    sleep = 0.0
    if kind not in ("get", "tlist") and rng.random() < faults.slow_handler:
        sleep = rng.expovariate(1 / faults.slow_handler_seconds)
    by = rng.randint(1, 9)
    key = rng.choice(REGISTER_KEYS)
    value = rng.randint(0, 1_000_000)
    timing = _timing(rng, faults, think_mean, protocol)
    spec = OperationSpec(
        tag=tag,
        kind=kind,
        facet=facet,
        target=target,
        by=by,
        key=key,
        value=value,
        sleep=sleep,
        think=timing.think,
        cancel_after=timing.cancel_after,
        deadline_seconds=timing.deadline_seconds,
    )
    if kind in ("tset", "tfail", "tcancel", "tlist") and facet not in timer_facets:
        spec = dataclasses.replace(spec, facet=rng.choice(timer_facets))
    if kind in ("tset", "tfail", "tcancel"):
        spec = dataclasses.replace(spec, name=rng.choice(TIMER_NAMES))
    if kind in ("tset", "tfail"):
        spec = _timer(rng, spec, faults)
    return spec


def _timer(rng: random.Random, spec: OperationSpec, faults: FaultRates) -> OperationSpec:
    """When a set timer is due and how its deliveries behave."""
    draw = rng.random()
    if draw < 0.15:
        after = 0.0  # due at once
    elif draw < 0.55:
        after = rng.expovariate(1 / 0.3)
    elif draw < 0.9:
        after = rng.expovariate(1 / 3.0)
    else:
        after = rng.uniform(10.0, 30.0)  # usually after the last call, or a restart
    absolute = rng.random() < 0.2
    if absolute and rng.random() < 0.3:
        after = -rng.uniform(0.0, 5.0)  # a time in the past: due at once
    draw = rng.random()
    fail_until = 0 if draw < 0.7 else rng.randint(1, 3) if draw < 0.9 else ALWAYS_FAILS
    rearms = 0 if rng.random() < 0.85 else rng.randint(1, 2)
    timer_sleep = 0.0
    if rng.random() < faults.slow_handler:
        timer_sleep = rng.expovariate(1 / faults.slow_handler_seconds)
    return dataclasses.replace(
        spec,
        after=after,
        absolute=absolute,
        fail_until=fail_until,
        rearms=rearms,
        rearm_after=rng.expovariate(1 / 0.5),
        timer_sleep=timer_sleep,
    )
