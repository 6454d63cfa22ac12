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
from ._storage_bridge import StoreWorkers
from ._supervisor import Supervisor
from ._timer_scheduler import TimerScheduler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping

    from .._values import Value
    from ..storage import FacetRecord

CLEANUP_SECONDS = 30.0
TIMER_INDEX_DIR = "timers"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeStatistics:
    """A snapshot of the runtime's state and counters.

    ``committed_envelopes / commits`` is the mean group-commit batch size.
    """

    open_facets: int
    idle_facets: int
    queued_envelopes: int
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
        """An operator's view of one facet: class, key count, map size, mailbox depth, timers
        (count, failed ones, next due time in seconds since the epoch).

        Goes through the facet's mailbox like a message (so it sees a consistent state and
        activates the facet if needed); it never returns stored values.

        Raises:
            NotFoundError: the facet does not exist.
        """
        address = FacetAddress(tenant, agent_id)
        reply = self._core.submit(
            address, "inspect", (), {}, cls=None, idempotency_key=None, chain=(), internal=True
        )
        result = await reply.wait()
        assert isinstance(result, dict)
        if result["class"] is None:
            raise NotFoundError(f"facet {str(address)!r} does not exist")
        return result

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
        counters = self._core.counters
        return RuntimeStatistics(
            open_facets=self._supervisor.open_count,
            idle_facets=self._supervisor.idle_count(),
            queued_envelopes=self._router.queued_envelopes(),
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

    Raises:
        ConfigError: bad classes, or the data directory is in use by another process.
    """
    config = config or RuntimeConfig()
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
        workers = StoreWorkers(config.commit_threads)
        workers.start()
        try:
            index = await workers.call(
                partial(
                    TimerIndex,
                    registry.data_dir / TIMER_INDEX_DIR,
                    map_size_bytes=config.timer_index_map_size_bytes,
                    readers_max=16,
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
                    )
                    supervisor = Supervisor(
                        config.open_facets_max,
                        wait_seconds_max=config.activation_wait_seconds_max,
                    )
                    router = Router(core=core, supervisor=supervisor, nursery=nursery)
                    core.router = router
                    scheduler = TimerScheduler(core=core, index=index)
                    core.timer_scheduler = scheduler
                    await nursery.start(scheduler.run)
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
