"""The embedded runtime: ``async with open_runtime(data_dir, classes=...) as rt``."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, final

import trio

from .._errors import ConfigError, NotFoundError
from .._ids import FacetAddress, validate_tenant_id
from ..config import RuntimeConfig
from ..storage import DataDirLock, StoreHooks, StoreRegistry, TimerIndex
from ._core import RuntimeCore
from ._facet import Facet
from ._router import Router
from ._storage_bridge import StoreJobs, StoreWorkers
from ._supervisor import Supervisor
from ._timer_scheduler import TimerScheduler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping

    from .._values import Value
    from ..config import TenantQuotaSettings
    from ..storage import FacetRecord
    from ._facet import EgressGateway
    from ._load import HistogramSnapshot
    from ._quotas import TenantQuotas

CLEANUP_SECONDS = 30.0
# The node reports saturation once its oldest queued message has waited this fraction of
# mailbox_age_seconds_max: shedding by age is then near.
SATURATION_AGE_FRACTION = 0.5
TIMER_INDEX_DIR = "timers"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeStatistics:
    """A snapshot of the runtime's state and counters.

    ``committed_envelopes / commits`` is the mean group-commit batch size; the two histograms
    give the distributions (batch size and commit seconds, one observation per commit).
    ``refusals`` counts refused calls by reason (``facets``, ``facet_bytes``, ``mailbox``,
    ``mailbox_age``, ``rate``).
    """

    open_facets: int
    idle_facets: int
    activations_waiting: int
    queued_envelopes: int
    mailbox_oldest_age_seconds: float
    mailboxes_full: int
    calls: int
    activations: int
    passivations: int
    resets: int
    commits: int
    committed_envelopes: int
    commit_seconds: float
    commits_inline: int
    commit_failures: int
    map_grows: int
    deactivations_cut_short: int
    overloaded: int
    timer_wakes: int
    timers_fired: int
    timer_handler_failures: int
    timers_failed: int
    timer_hints_removed: int
    refusals: dict[str, int]
    commit_batch_envelopes: HistogramSnapshot
    commit_durations: HistogramSnapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class Saturation:
    """Whether the node is near shedding, and why (``/readyz`` shows it).

    Reasons: ``mailbox_age`` (the oldest queued message has waited at least half of
    ``mailbox_age_seconds_max``), ``mailbox_full`` (some facet's mailbox is at its bound),
    ``open_facets`` (activations wait for an open permit at ``open_facets_max``).
    """

    saturated: bool
    reasons: tuple[str, ...]
    oldest_queued_seconds: float
    mailboxes_full: int
    queued_envelopes: int
    open_facets: int
    open_facets_max: int
    activations_waiting: int


@final
class Runtime:
    """Hosts facets in this process. Obtain one from :func:`open_runtime`."""

    def __init__(self, core: RuntimeCore, router: Router, supervisor: Supervisor) -> None:
        self._core = core
        self._router = router
        self._supervisor = supervisor

    @property
    def config(self) -> RuntimeConfig:
        return self._core.config

    @property
    def core(self) -> RuntimeCore:
        """Internal: the runtime's core, for facetrt's own server (the batched call path)."""
        return self._core

    async def call(
        self,
        tenant: str,
        agent_id: str,
        method: str,
        /,
        *args: Value,
        cls: str | None = None,
        idempotency_key: str | None = None,
        **kwargs: Value,
    ) -> Value:
        """Send one message to facet ``tenant/agent_id`` and return its result.

        With ``cls``, the facet is created bound to that class if it does not exist (and the
        call fails ``conflict`` if it is bound to another); without, it must exist. The result
        is returned only after the message's writes are durable.

        Cancellation (a deadline) abandons the call: a message not started yet is skipped, one
        already running completes and commits, so the outcome is unknown; retry with the same
        ``idempotency_key`` to learn it without applying it twice.

        Raises:
            FacetrtError: a subclass carrying the SPEC §4 ``code`` and ``retryable``.
        """
        address = self._core.address_of(tenant, agent_id)
        return await self._core.call(
            address, method, args, kwargs, cls=cls, idempotency_key=idempotency_key, chain=()
        )

    async def inspect(self, tenant: str, agent_id: str) -> dict[str, Value]:
        """An operator's view of one facet: class, key count, map size, timers (count, failed
        ones, next due time in seconds since the epoch), and its load: mailbox depth and bound,
        age of the oldest queued message, recent batch sizes and commit latencies.

        A running facet is read at once, from its committed state, without queueing behind
        its messages (an overloaded facet is the one an operator wants to see). Otherwise the
        request goes through the facet's mailbox like a message, activating it. It never
        returns stored values.

        Raises:
            NotFoundError: the facet does not exist.
            OverloadedError: the facet is not running and its mailbox refuses messages.
        """
        address = FacetAddress(tenant, agent_id)
        activation = self._router.running_activation(address)
        if activation is not None:
            await trio.lowlevel.checkpoint()
            result = activation.inspect()
        else:
            reply = self._core.submit(
                address, "inspect", (), {}, cls=None, idempotency_key=None, chain=(), internal=True
            )
            value = await reply.wait()
            assert isinstance(value, dict)
            result = value
        if result["class"] is None:
            raise NotFoundError(f"facet {str(address)!r} does not exist")
        return result

    # -- quotas --------------------------------------------------------------------------

    def tenant_quotas(self, tenant: str) -> TenantQuotas:
        """The quotas in force for ``tenant``: node defaults with its overrides applied.

        Raises:
            AddressError: a malformed tenant id.
        """
        validate_tenant_id(tenant)
        return self._core.quotas.effective(tenant)

    def tenant_quota_overrides(self, tenant: str) -> TenantQuotaSettings | None:
        """The overrides set for ``tenant`` (None: node defaults only)."""
        validate_tenant_id(tenant)
        return self._core.quotas.overrides(tenant)

    def set_tenant_quotas(self, tenant: str, settings: TenantQuotaSettings | None) -> TenantQuotas:
        """Replace ``tenant``'s quota overrides (None: back to the node defaults), in force
        from the next call; return the quotas now in force.

        In memory only: the daemon persists them in its system store (the admin API does
        both). Open mailboxes take the new bound at once (envelopes queued beyond a lowered
        one stay queued); open stores take a new bytes-per-facet bound the next time they
        need to grow; stores already bigger than it keep their size (decision 0010).

        Raises:
            AddressError: a malformed tenant id.
        """
        validate_tenant_id(tenant)
        quotas = self._core.quotas.set_overrides(tenant, settings)
        self._router.set_mailbox_bound(tenant, quotas.mailbox_envelopes_max)
        return quotas

    async def tenant_facet_count(self, tenant: str) -> int:
        """How many facets ``tenant`` has on this node (counted from disk the first time).

        Raises:
            AddressError: a malformed tenant id.
        """
        validate_tenant_id(tenant)
        core = self._core
        scan = partial(core.workers.call, partial(core.registry.count_facets, tenant))
        return await core.quotas.count_facets(tenant, scan)

    async def list_facets(
        self, tenant: str, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[FacetRecord], str | None]:
        """A page of ``tenant``'s facets (agent id, class, size, last commit), without
        opening them; see ``StoreRegistry.list_facets``.

        The page is read on a writer thread: a directory scan, one hint read and one ``stat``
        per facet take tens of milliseconds for a page of 1,000, too long for the loop.
        Cancellation waits for that read to end and discards it.

        Returns:
            (records, the cursor of the next page or None at the end).
        """
        validate_tenant_id(tenant)
        registry = self._core.registry
        page = await self._core.workers.call(
            partial(registry.list_facets, tenant, start_after=cursor, limit=limit)
        )
        next_cursor = page[-1].cursor if len(page) == limit else None
        return page, next_cursor

    def statistics(self) -> RuntimeStatistics:
        """A snapshot of state and counters; call from the loop thread (it reads trio's clock
        for the age of the oldest queued message)."""
        counters = self._core.counters
        oldest, full = self._router.mailbox_load()
        commit_stats = self._core.commit_stats
        return RuntimeStatistics(
            open_facets=self._supervisor.open_count,
            idle_facets=self._supervisor.idle_count(),
            activations_waiting=self._supervisor.waiting_count(),
            queued_envelopes=self._router.queued_envelopes(),
            mailbox_oldest_age_seconds=0.0 if oldest is None else trio.current_time() - oldest,
            mailboxes_full=full,
            calls=counters.calls,
            activations=counters.activations,
            passivations=counters.passivations,
            resets=counters.resets,
            commits=counters.commits,
            committed_envelopes=counters.committed_envelopes,
            commit_seconds=counters.commit_seconds,
            commits_inline=counters.commits_inline,
            commit_failures=counters.commit_failures,
            map_grows=counters.map_grows,
            deactivations_cut_short=counters.deactivations_cut_short,
            overloaded=counters.overloaded,
            timer_wakes=counters.timer_wakes,
            timers_fired=counters.timers_fired,
            timer_handler_failures=counters.timer_handler_failures,
            timers_failed=counters.timers_failed,
            timer_hints_removed=counters.timer_hints_removed,
            refusals=dict(self._core.quotas.refusals),
            commit_batch_envelopes=commit_stats.batch_envelopes.snapshot(),
            commit_durations=commit_stats.seconds.snapshot(),
        )

    def saturation(self) -> Saturation:
        """Whether the node is near shedding calls, and why; call from the loop thread.

        A scan of the open slots (no per-call cost). Saturation does not make the node
        unready: its facets live here, so sending calls elsewhere would not help them
        (decision 0010); calls beyond the bounds are shed with ``overloaded``.
        """
        config = self._core.config
        oldest, full = self._router.mailbox_load()
        age = 0.0 if oldest is None else trio.current_time() - oldest
        waiting = self._supervisor.waiting_count()
        reasons = []
        if age >= config.mailbox_age_seconds_max * SATURATION_AGE_FRACTION:
            reasons.append("mailbox_age")
        if full:
            reasons.append("mailbox_full")
        if waiting:
            reasons.append("open_facets")
        return Saturation(
            saturated=bool(reasons),
            reasons=tuple(reasons),
            oldest_queued_seconds=round(age, 6),
            mailboxes_full=full,
            queued_envelopes=self._router.queued_envelopes(),
            open_facets=self._supervisor.open_count,
            open_facets_max=config.open_facets_max,
            activations_waiting=waiting,
        )

    async def aclose(self) -> None:
        """Drain and close: refuse new calls, let queued messages finish within
        ``shutdown_grace_seconds``, then fail what is left with ``unavailable`` (retryable).

        Every activation flushes its finished messages and closes its store before this returns.
        """
        core = self._core
        if core.stopped:
            await trio.lowlevel.checkpoint()
            return
        core.closing = True
        if core.timer_scheduler is not None:
            core.timer_scheduler.stop()
        self._supervisor.stop()
        for activation in self._router.activations():
            activation.request_stop()
        with trio.move_on_after(core.config.shutdown_grace_seconds, shield=True):
            await self._router.wait_empty()
        core.stopped = True
        for activation in self._router.activations():
            activation.cancel()
        with trio.move_on_after(CLEANUP_SECONDS, shield=True):
            await self._router.wait_empty()


@contextlib.asynccontextmanager
async def open_runtime(
    data_dir: str | Path,
    *,
    classes: Mapping[str, type[Facet]],
    config: RuntimeConfig | None = None,
    store_hooks: StoreHooks | None = None,
    wall_clock: Callable[[], float] = time.time,
    egress: EgressGateway | None = None,
) -> AsyncIterator[Runtime]:
    """Open a runtime hosting ``classes`` with its data under ``data_dir``.

    The data directory is locked for this process until the block exits; the runtime is
    closed gracefully (see :meth:`Runtime.aclose`) when it does.

    Args:
        data_dir: where facet stores live (created if missing).
        classes: facet class name -> :class:`Facet` subclass.
        config: limits and timings; defaults when omitted.
        store_hooks: fault injection for tests (``facetrt.testing``).
        wall_clock: the clock of idempotency retention and timer due times (seconds since
            the epoch). Timers sleep on trio's clock for ``due - wall_clock()``, so tests that
            use trio's autojump clock pass one derived from it, e.g.
            ``lambda: 1.7e9 + trio.current_time()``.
        egress: what performs ``self.fetch`` (a ``facetrt.policy.Egress``, running for as
            long as the runtime); without one every fetch fails ``policy_violation``.

    Raises:
        ConfigError: bad classes, or the data directory is in use by another process.
    """
    config = config or RuntimeConfig()
    workers = StoreWorkers(config.commit_threads, jobs_max=config.commit_queue_max)
    async with open_runtime_using(
        workers,
        data_dir,
        classes=classes,
        config=config,
        store_hooks=store_hooks,
        wall_clock=wall_clock,
        egress=egress,
    ) as runtime:
        yield runtime


@contextlib.asynccontextmanager
async def open_runtime_using(
    workers: StoreJobs,
    data_dir: str | Path,
    *,
    classes: Mapping[str, type[Facet]],
    config: RuntimeConfig,
    store_hooks: StoreHooks | None,
    wall_clock: Callable[[], float],
    egress: EgressGateway | None = None,
) -> AsyncIterator[Runtime]:
    """:func:`open_runtime` with its store jobs run by ``workers`` (not started yet; stopped
    when the block exits). Internal: the seeded simulation runs them on the loop thread."""
    for name, cls in classes.items():
        if not (isinstance(cls, type) and issubclass(cls, Facet)):
            raise ConfigError(f"class {name!r} is not a Facet subclass: {cls!r}")
    lock = DataDirLock(Path(data_dir))
    try:
        registry = StoreRegistry(
            Path(data_dir),
            map_size_bytes=config.map_size_bytes_initial,
            map_size_bytes_max=config.map_size_bytes_max,
            hooks=store_hooks,
        )
        workers.start()
        try:
            index = await workers.call(
                partial(
                    TimerIndex,
                    registry.data_dir / TIMER_INDEX_DIR,
                    map_size_bytes=config.timer_index_map_size_bytes,
                    readers_max=16,
                    hooks=store_hooks,
                )
            )
            try:
                async with trio.open_nursery() as nursery:
                    core = RuntimeCore(
                        config=config,
                        classes=classes,
                        registry=registry,
                        workers=workers,
                        timer_index=index,
                        wall_clock=wall_clock,
                        egress=egress,
                    )
                    supervisor = Supervisor(
                        config.open_facets_max,
                        wait_seconds_max=config.activation_wait_seconds_max,
                        idle_timeout_seconds=config.idle_timeout_seconds,
                    )
                    router = Router(core=core, supervisor=supervisor, nursery=nursery)
                    core.router = router
                    scheduler = TimerScheduler(core=core, index=index)
                    core.timer_scheduler = scheduler
                    await nursery.start(scheduler.run)
                    await nursery.start(supervisor.sweep_idle)
                    runtime = Runtime(core, router, supervisor)
                    try:
                        yield runtime
                    finally:
                        await runtime.aclose()
            finally:
                # Every activation (the only writers of the index) has exited with the nursery.
                with trio.move_on_after(CLEANUP_SECONDS, shield=True):
                    await workers.call(index.close)
        finally:
            with trio.move_on_after(CLEANUP_SECONDS, shield=True):
                await workers.stop()
    finally:
        lock.release()
