"""Load for the fault tests: counters written by pipelined callers, every outcome recorded.

Writers call ``Counter.increment`` on their facet with no retries (``retries=0``), so each
call has exactly one outcome: acknowledged with the counter's new value, failed with a SPEC §4
code, or unknown (the connection was lost: the call may or may not have run). Readers call
``Counter.get`` on facets nobody writes, and a poller reads ``/healthz``: these must never
fail, faults or not, since they need no commit.

:meth:`Ledger.check` then holds a facet's value, read back from the daemon, against what its
callers saw. For a counter every acknowledged value is distinct, so with ``v`` the value read:

- every acknowledged value is at most ``v`` (no acknowledged write was lost), and no value
  was acknowledged twice (no write was applied twice);
- the values ``1..v`` not acknowledged are at most the calls with an unknown outcome: a call
  that failed (``internal`` after a failed commit) left no write behind.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from facetrt import FacetrtError
from facetrt.client import connect

if TYPE_CHECKING:
    import httpx

    from facetrt.client import AsyncClient

# Codes a write may fail with while storage faults are injected: the failed commit (or the
# failed open of a new store) answers ``internal``; nothing else is expected.
EXPECTED_WRITE_FAILURES: Final = frozenset({"internal"})


@dataclass(slots=True)
class FacetLedger:
    """What the callers of one counter saw."""

    acks: list[int] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    unknown: int = 0


@dataclass(slots=True)
class Ledger:
    """Outcomes of every call of a run, per facet, plus the readers' and poller's."""

    facets: dict[str, FacetLedger] = field(default_factory=dict)
    reads: int = 0
    read_failures: list[str] = field(default_factory=list)
    health_checks: int = 0
    health_failures: list[str] = field(default_factory=list)
    retryable_failures: int = 0
    non_retryable_failures: list[str] = field(default_factory=list)
    # Timers: names whose ``set`` was acknowledged, or failed, per Alarm facet.
    timers_set: dict[str, set[str]] = field(default_factory=dict)
    timers_refused: dict[str, set[str]] = field(default_factory=dict)
    # Tenants created through the admin API (201), or refused with a retryable internal.
    tenants_created: list[str] = field(default_factory=list)
    tenants_refused: list[str] = field(default_factory=list)
    admin_problems: list[str] = field(default_factory=list)
    # What each failure was, by where it happened (see ``failure_kind``).
    failure_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    failure_samples: dict[str, str] = field(default_factory=dict)  # place -> first message

    def failure_seen(self, message: str) -> None:
        place = failure_kind(message)
        self.failure_kinds[place] += 1
        self.failure_samples.setdefault(place, message)

    def facet(self, agent: str) -> FacetLedger:
        return self.facets.setdefault(agent, FacetLedger())

    @property
    def acknowledged(self) -> int:
        return sum(len(entry.acks) for entry in self.facets.values())

    @property
    def failed(self) -> int:
        return sum(entry.failures.total() for entry in self.facets.values())

    def failures_by_code(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for entry in self.facets.values():
            total.update(entry.failures)
        return total

    def check(self, values: dict[str, int]) -> tuple[int, list[str]]:
        """Hold the values read back against the ledger: (acknowledged writes lost, problems)."""
        lost = 0
        problems: list[str] = []
        for agent, entry in sorted(self.facets.items()):
            value = values.get(agent, 0)
            missing = [ack for ack in entry.acks if ack > value]
            lost += len(missing)
            if missing:
                problems.append(f"{agent}: read {value}, acknowledged {sorted(missing)[:5]}...")
            repeated = [ack for ack, n in collections.Counter(entry.acks).items() if n > 1]
            if repeated:
                problems.append(f"{agent}: values acknowledged twice: {sorted(repeated)[:5]}")
            applied_unacknowledged = value - len(set(entry.acks) & set(range(1, value + 1)))
            if applied_unacknowledged > entry.unknown:
                problems.append(
                    f"{agent}: {applied_unacknowledged} increments applied but not acknowledged, "
                    f"only {entry.unknown} calls had an unknown outcome (failed calls wrote?)"
                )
        problems += [f"read failed: {failure}" for failure in self.read_failures[:5]]
        problems += [f"/healthz failed: {failure}" for failure in self.health_failures[:5]]
        problems += [f"not retryable: {failure}" for failure in self.non_retryable_failures[:5]]
        problems += self.admin_problems[:5]
        unexpected = set(self.failures_by_code()) - EXPECTED_WRITE_FAILURES
        if unexpected:
            problems.append(f"writes failed with unexpected codes: {sorted(unexpected)}")
        return lost, problems


async def write_loop(client: AsyncClient, ledger: Ledger, agent: str, stop: trio.Event) -> None:
    """Increment ``agent`` until ``stop`` is set."""
    entry = ledger.facet(agent)
    while not stop.is_set():
        try:
            value = await client.call(agent, "increment", cls="Counter")
        except FacetrtError as exc:
            record_failure(ledger, entry, agent, exc)
            await trio.sleep(0.001)  # a failed facet resets: do not spin on it
        else:
            assert isinstance(value, int)
            entry.acks.append(value)


def failure_kind(message: str) -> str:
    """Where a failure happened, from its message."""
    if "timer index" in message:
        return "timer index write"
    if "commit failed" in message:
        return "facet commit"
    if "cannot open store" in message:
        return "store creation"
    if "read failed" in message:
        return "facet read"  # a read of a store LMDB refused after a failed meta page write
    if "system store" in message:
        return "system store write"
    return "other"


def record_failure(ledger: Ledger, entry: FacetLedger, agent: str, exc: FacetrtError) -> None:
    ledger.failure_seen(exc.message)
    if exc.code in ("unavailable", "timeout"):
        entry.unknown += 1  # a lost connection or deadline: the call may have run
    else:
        entry.failures[exc.code] += 1
    if exc.retryable:
        ledger.retryable_failures += 1
    else:
        ledger.non_retryable_failures.append(f"{agent}: {exc.code}: {exc.message}")


async def create_loop(
    client: AsyncClient, ledger: Ledger, prefix: str, stop: trio.Event, *, pause: float = 0.02
) -> None:
    """Create new counters one after another (``<prefix>0``, ...), each called until its
    first increment is acknowledged: new stores, whose directories are fsynced."""
    index = 0
    while not stop.is_set():
        agent = f"{prefix}{index}"
        entry = ledger.facet(agent)
        while not entry.acks:
            try:
                value = await client.call(agent, "increment", cls="Counter")
            except FacetrtError as exc:
                record_failure(ledger, entry, agent, exc)
                await trio.sleep(0.005)
            else:
                assert isinstance(value, int)
                entry.acks.append(value)
        index += 1
        await trio.sleep(pause)


async def timer_loop(
    client: AsyncClient, ledger: Ledger, agent: str, stop: trio.Event, *, after_seconds: float
) -> None:
    """Set timers ``t0``, ``t1``, ... on the Alarm facet ``agent``, each due shortly."""
    acked = ledger.timers_set.setdefault(agent, set())
    refused = ledger.timers_refused.setdefault(agent, set())
    index = 0
    while not stop.is_set():
        name = f"t{index}"
        index += 1
        try:
            await client.call(agent, "set", name, after_seconds=after_seconds, cls="Alarm")
        except FacetrtError as exc:
            refused.add(name)
            ledger.failure_seen(exc.message)
            if not exc.retryable or exc.code != "internal":
                ledger.admin_problems.append(f"timer {agent}/{name}: {exc.code}: {exc.message}")
            await trio.sleep(0.005)
        else:
            acked.add(name)
        await trio.sleep(0.01)


async def check_timers(client: AsyncClient, ledger: Ledger, *, seconds: float) -> list[str]:
    """Wait until every acknowledged timer fired; problems: acknowledged timers that never
    fired, refused ones that did (a failed ``set`` must leave nothing), any fired twice."""
    deadline = trio.current_time() + seconds
    problems: list[str] = []
    for agent, acked in sorted(ledger.timers_set.items()):
        while True:
            fired = await client.call(agent, "fired", cls="Alarm")
            assert isinstance(fired, dict)
            missing = acked - set(fired)
            if not missing or trio.current_time() > deadline:
                break
            await trio.sleep(0.2)
        if missing:
            problems.append(f"{agent}: acknowledged timers never fired: {sorted(missing)[:5]}")
        ghosts = ledger.timers_refused.get(agent, set()) & set(fired)
        if ghosts:
            problems.append(f"{agent}: refused timers fired: {sorted(ghosts)[:5]}")
        twice = sorted(name for name, count in fired.items() if count != 1)
        if twice:
            problems.append(f"{agent}: timers whose delivery committed twice: {twice[:5]}")
    return problems


async def tenant_loop(
    http: httpx.AsyncClient, admin_key: str, ledger: Ledger, prefix: str, stop: trio.Event
) -> None:
    """Create tenants through the admin API: each answer is 201, or a retryable internal."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    index = 0
    while not stop.is_set():
        tenant = f"{prefix}{index}"
        index += 1
        response = await http.post("/v1/admin/tenants", json={"tenant": tenant}, headers=headers)
        if response.status_code == 201:
            ledger.tenants_created.append(tenant)
        else:
            error = response.json().get("error", {})
            if (response.status_code, error.get("code"), error.get("retryable")) == (
                500,
                "internal",
                True,
            ):
                ledger.tenants_refused.append(tenant)
                ledger.failure_seen(error["message"])
            else:
                ledger.admin_problems.append(f"tenant {tenant}: {response.text[:200]}")
        await trio.sleep(0.05)


async def check_tenants(http: httpx.AsyncClient, admin_key: str, ledger: Ledger) -> list[str]:
    """Created tenants exist; refused ones do not (tenant and key commit together)."""
    response = await http.get("/v1/admin/tenants", headers={"Authorization": f"Bearer {admin_key}"})
    response.raise_for_status()
    existing = set(response.json()["tenants"])
    problems = [
        f"created tenant {t} is missing" for t in ledger.tenants_created if t not in existing
    ]
    problems += [f"refused tenant {t} exists" for t in ledger.tenants_refused if t in existing]
    return problems


async def read_loop(
    client: AsyncClient, ledger: Ledger, agents: list[str], stop: trio.Event
) -> None:
    """Read ``agents`` (which nobody writes) round robin until ``stop``."""
    index = 0
    while not stop.is_set():
        agent = agents[index % len(agents)]
        index += 1
        try:
            await client.call(agent, "get")
        except FacetrtError as exc:
            ledger.read_failures.append(f"{agent}: {exc.code}: {exc.message}")
        ledger.reads += 1
        await trio.sleep(0.002)


async def health_loop(http: httpx.AsyncClient, ledger: Ledger, stop: trio.Event) -> None:
    while not stop.is_set():
        response = await http.get("/healthz")
        ledger.health_checks += 1
        if response.status_code != 200:
            ledger.health_failures.append(f"{response.status_code} {response.text[:200]}")
        await trio.sleep(0.02)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadShape:
    writers: tuple[str, ...]
    callers_per_writer: int = 4
    readers: tuple[str, ...] = ()


async def run_load(
    url: str,
    key: str,
    http: httpx.AsyncClient,
    shape: LoadShape,
    ledger: Ledger,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run writers, readers and the health poller until ``stop`` is set."""
    async with (
        connect(url, key=key, retries=0) as writers,
        connect(url, key=key, retries=0) as readers,
        trio.open_nursery() as nursery,
    ):
        for agent in shape.writers:
            for _ in range(shape.callers_per_writer):
                nursery.start_soon(write_loop, writers, ledger, agent, stop)
        if shape.readers:
            nursery.start_soon(read_loop, readers, ledger, list(shape.readers), stop)
        nursery.start_soon(health_loop, http, ledger, stop)
        task_status.started()


async def read_counters(url: str, key: str, agents: list[str]) -> dict[str, int]:
    """Each counter's value as the daemon serves it now."""
    values: dict[str, int] = {}
    async with connect(url, key=key, retries=0) as client:
        for agent in agents:
            value = await client.call(agent, "get")
            assert isinstance(value, int), (agent, value)
            values[agent] = value
    return values
